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
    try:
        payload = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return payload if isinstance(payload, dict) else None


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
        follows = ", ".join(
            f"seed {s}: {100 * per_seed[s]['premise']['second_view_follows_style']:.0f} %" for s in failed
        )
        notes.append(
            f"PREMISE CHECK FAILED for {len(failed)} of {len(per_seed)} seed(s) ({follows} of the bias "
            "model's edits moved the Vanilla model too; the check needs "
            f"{100 * per_seed[failed[0]]['premise']['min_follow']:.0f} %). The bias model does not seem to "
            "read a shortcut that plain training takes, so DiffInject's synthetic images were not used there "
            "and its row is plain ERM on the real images: on this data the method has nothing to add"
        )
    mostly_rejected = [
        s
        for s, g in per_seed.items()
        if s not in failed and g.get("enabled") and g.get("num_rows") and g["accepted"] < g["num_rows"] / 2
    ]
    if mostly_rejected:
        notes.append(
            "the gate rejected most synthetic images for seed(s) "
            + ", ".join(
                f"{s} ({per_seed[s]['accepted']} of {per_seed[s]['num_rows']} kept)" for s in mostly_rejected
            )
            + ": the generator rarely moved the bias attribute while keeping the content"
        )
    return {"per_seed": per_seed, "notes": notes}


def gate_lines(gate: dict[str, Any] | None) -> list[str]:
    """The report's markdown section."""
    if not gate:
        return ["– (no gate figures in `inject/injection_check.json`)"]
    lines = [
        "| seed | judged | accepted | not moved | not retained | Vanilla follows | premise | debias |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, g in gate["per_seed"].items():
        premise = g.get("premise") or {}
        follows = premise.get("second_view_follows_style")
        verdict = {True: "holds", False: "**fails**", None: "no verdict"}[premise.get("holds")]
        trained = "plain ERM" if g.get("debias_fallback") else "DiffInject"
        lines.append(
            f"| {seed} | {g['num_rows']} | {g['accepted']} | {g['rejected_not_moved']} | "
            f"{g['rejected_not_retained']} | {'–' if follows is None else f'{100 * follows:.0f} %'} "
            f"(n = {premise.get('n', 0)}) | {verdict} | {trained} |"
        )
    threshold = next(iter(gate["per_seed"].values())).get("min_confidence")
    lines += [
        "",
        f"Accepted: the bias model gives the style's class p ≥ {threshold} on the synthetic image and the "
        "content "
        "is retained (label-free). Premise: on the images the bias model calls moved, the share on which an "
        "independently trained Vanilla model follows the edit to the style's class.",
    ]
    lines += [f"- {note}" for note in gate["notes"]]
    return lines
