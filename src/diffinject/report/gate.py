"""The inject stage's gate and premise check, per seed, for the report: what the debiased model trained on.

Read from `seed{S}/inject/injection_check.json` (written by `callbacks.InjectionCheck`) and the debias stage's
`metrics.json` (`fallback`: why it trained plain ERM). The notes say in plain words when the method's premise
did not hold or the gate rejected most of a set, so a user sees it beside the table, not in a log.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _read(path: Path) -> dict[str, Any] | None:
    """The file's JSON object, or None when it is missing or unreadable (ValueError: not UTF-8 or not JSON);
    the method table warns about an unreadable metrics.json itself."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return payload if isinstance(payload, dict) else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _premise_figures(premise: dict[str, Any]) -> str:
    """ "style % / content % (z = …, n = …)" of the premise check."""
    style, content = premise.get("second_view_follows_style"), premise.get("second_view_follows_content")
    return f"{_percent(style)} / {_percent(content)} (z = {premise.get('z')}, n = {premise.get('n', 0)})"


def _validation_figures(premise: dict[str, Any]) -> str:
    """ "bias % / Vanilla % (z = …)" on the validation split, or "–" when the signal was not computed."""
    validation = premise.get("validation")
    if not isinstance(validation, dict):
        return "–"
    bias, vanilla = (validation.get(k) for k in ("bias_acc", "view_acc"))
    if bias is None or vanilla is None:
        return "–"
    return f"{100 * bias:.1f} / {100 * vanilla:.1f} % (z = {validation.get('z')})"


def collect_gate(root: Path, seeds: Sequence[int]) -> dict[str, Any] | None:
    """Per seed: accepted / judged synthetic images, the premise figures and the debias fallback; notes."""
    per_seed: dict[str, Any] = {}
    for seed in seeds:
        check = _read(root / f"seed{seed}" / "inject" / "injection_check.json") or {}
        gate = check.get("gate")
        if not isinstance(gate, dict):
            continue
        metrics = _read(root / f"seed{seed}" / "debias" / "metrics.json") or {}
        per_seed[str(seed)] = {**gate, "debias_fallback": metrics.get("fallback")}
    if not per_seed:
        return None
    notes = []
    failed = [s for s, g in per_seed.items() if (g.get("premise") or {}).get("holds") is False]
    if failed:
        figures = ", ".join(f"seed {s}: {_premise_figures(per_seed[s]['premise'])}" for s in failed)
        notes.append(
            f"PREMISE CHECK FAILED for {len(failed)} of {len(per_seed)} seed(s): on the images the bias "
            "model calls moved, the Vanilla model moved to the style's class no more clearly than it kept "
            f"the content's (style / content, {figures}), and the bias model was not more accurate than "
            "Vanilla on the validation split. The bias model does not seem to read a shortcut "
            "that plain training takes, so DiffInject's synthetic images were not used there and its row is "
            "plain ERM on the real images: on this data the method has nothing to add"
        )
    lost = [s for s, g in per_seed.items() if g.get("content_lost")]
    if lost:
        notes.append(
            f"CONTENT LOST for seed(s) {', '.join(lost)}: most synthetic images no longer resemble their "
            "content image (the generator redrew them as the style's class), so none was used; DiffInject's "
            "row is plain ERM there"
        )
    mostly_rejected = [
        s
        for s, g in per_seed.items()
        if s not in failed
        and s not in lost
        and g.get("enabled")
        and g.get("num_rows")
        and g["accepted"] < g["num_rows"] / 2
    ]
    if mostly_rejected:
        kept = ", ".join(
            f"{s} ({per_seed[s]['accepted']} of {per_seed[s]['num_rows']})" for s in mostly_rejected
        )
        notes.append(
            f"the gate rejected most synthetic images for seed(s) {kept}: the bias model was not confident "
            "that the attribute moved; only the accepted ones are used"
        )
    return {"per_seed": per_seed, "notes": notes}


def gate_lines(gate: dict[str, Any] | None) -> list[str]:
    """The report's markdown section."""
    if not gate:
        return ["– (no gate figures in `inject/injection_check.json`)"]
    lines = [
        "| seed | judged | accepted | unmoved | content kept | Vanilla: style / content | validation: bias / "
        "Vanilla | premise | used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for seed, g in gate["per_seed"].items():
        premise = g.get("premise") or {}
        verdict = {True: "holds", False: "**fails**", None: "no verdict"}[premise.get("holds")]
        if premise.get("evidence"):
            verdict += f" ({premise['evidence']})"
        trained = "plain ERM" if g.get("debias_fallback") else "DiffInject"
        lines.append(
            f"| {seed} | {g['num_rows']} | {g['accepted']} | {g['rejected_not_moved']} | "
            f"{_percent(g.get('content_retention'))} | {_premise_figures(premise)} | "
            f"{_validation_figures(premise)} | {verdict} | {trained} |"
        )
    threshold = next(iter(gate["per_seed"].values())).get("min_confidence")
    first_premise = next(iter(gate["per_seed"].values())).get("premise") or {}
    lines += [
        "",
        f"Accepted: the bias model gives the style's class p ≥ {threshold} on the synthetic image, and the "
        "set keeps its contents (content kept: the share closer to its content's bottleneck features than "
        "to the style's; label-free). Premise: on the images the bias model calls moved, the share on "
        "which an independently trained Vanilla model moves to the style's class against the share on "
        "which it keeps the content's; the premise holds when the difference is at least "
        f"{first_premise.get('min_z')} standard errors (z; evidence: edits), or when it is positive and the "
        "bias model is more accurate than Vanilla on the validation split (McNemar z > "
        f"{first_premise.get('min_val_z')}; evidence: validation): a shortcut decides a split biased like "
        "the training set at least as well as plain training does, a weaker model of the class does not.",
    ]
    lines += [f"- {note}" for note in gate["notes"]]
    return lines
