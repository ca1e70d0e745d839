"""The inject stage's gate: judge every finished synthetic image and decide what the debias stage trains on.

`InjectionCheck` (with `gate` on, as in the pipeline's configs) calls `judge_rows` on every finished sample
and `gate_folder`, which writes `manifest_accepted.csv` (the manifest's rows that pass, same columns) and
`gate.csv` (one line per sample: the figures it was judged on). The rules:
- per sample (`injection_check.gate_samples`): the bias model gives the style's class probability ≥
  `gate_min_confidence` on the synthetic image;
- per set, **content**: when fewer than `gate_min_retention` of the images keep their content (closer to the
  content's bottleneck features than to the style's), the generator replaced the contents rather than moving
  an attribute, and nothing is accepted;
- per set, the **premise check** (`injection_check.second_view_transfer`, with `second_view_checkpoint`, the
  seed's Vanilla ERM model): on the images the per-image test accepts, does an independently trained ERM
  model follow the edit to the style's class clearly more often than it keeps the content's? When the
  difference is below `premise_z` standard errors, the bias model's attribute
  is not a shortcut plain training takes (or the edit only fooled the bias model), the method's premise
  does not hold, and nothing is accepted: the debias stage then trains plainly on the real images
  (`if_no_synthetic: erm`) and the summary and the report say why.
With the gate off every sample is accepted (and still judged, for the report).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS, write_manifest_atomic
from diffinject.measures.injection_check import (
    DEFAULT_FEATURE_T,
    bottleneck_h,
    content_scores,
    gate_samples,
    paired_accuracy,
    predict_probs,
    second_view_transfer,
)
from diffinject.measures.synthetic_set import load_images

ACCEPTED_FILENAME = "manifest_accepted.csv"
GATE_FILENAME = "gate.csv"
GATE_COLUMNS = ("index", "p_style_class", "retained", "second_view_class", "accepted")
#: images per chunk of the gate (bounds memory on large images)
GATE_CHUNK = 512
#: default premise threshold, in standard errors (`injection_check.second_view_transfer`; measured values in
#: docs/results/bias-trees.md)
PREMISE_Z = 3.5
#: the validation signal's threshold (McNemar z of bias model against ERM; `premise_verdict`); None = off
PREMISE_VAL_Z: float | None = 1.0


def training_images(dataset: Any, indices: list[int]) -> torch.Tensor:
    """Float [0, 1] N×C×H×W of training items, rounded to the uint8 grid the synthetic PNGs are stored on."""
    images = torch.stack([dataset[int(i)]["image"].float() for i in indices])
    return (images * 255.0).round().clamp(0, 255) / 255.0


def judge_rows(
    folder: Path,
    rows: list[dict[str, str]],
    bias_net: nn.Module,
    unet: nn.Module,
    model_size: int,
    train_dataset: Any,
    second_view: nn.Module | None,
    feature_t: int = DEFAULT_FEATURE_T,
) -> dict[str, torch.Tensor]:
    """Per-sample figures of the gate over `rows`: p_style_class, retained, moved, and the second view's
    classes of the synthetic / content / style images (-1 without a second view). In chunks."""
    channels = int(train_dataset[0]["image"].shape[0])
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(rows), GATE_CHUNK):
        chunk = rows[start : start + GATE_CHUNK]
        images = {
            "synthetic": torch.from_numpy(load_images([folder / r["path"] for r in chunk], channels)).float()
            / 255.0,
            "content": training_images(train_dataset, [int(r["content_index"]) for r in chunk]),
            "style": training_images(train_dataset, [int(r["style_index"]) for r in chunk]),
        }
        probs = {name: predict_probs(bias_net, x) for name, x in images.items()}
        style_class = probs["style"].argmax(1)
        feats = [
            bottleneck_h(unet, images[n], model_size, feature_t) for n in ("synthetic", "content", "style")
        ]
        out = {
            "p_style_class": probs["synthetic"].gather(1, style_class[:, None]).squeeze(1),
            "moved": probs["synthetic"].argmax(1) == style_class,
            "retained": content_scores(*feats, normalise=True)["retained"],
        }
        for name, x in images.items():
            view = predict_probs(second_view, x).argmax(1) if second_view is not None else None
            out[f"view_{name}"] = view if view is not None else torch.full((len(chunk),), -1)
        for key, value in out.items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}


@torch.no_grad()
def validation_comparison(bias_net: nn.Module, second_view: nn.Module, val_dataset: Any) -> dict[str, Any]:
    """`injection_check.paired_accuracy` of the bias model against the second view on the validation split
    (class labels only; no bias label is read)."""
    labels = torch.tensor([int(val_dataset[i]["label"]) for i in range(len(val_dataset))])
    if len(labels) == 0:
        return paired_accuracy(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool))
    right = {"bias": [], "view": []}
    for start in range(0, len(labels), GATE_CHUNK):
        stop = min(start + GATE_CHUNK, len(labels))
        images = training_images(val_dataset, list(range(start, stop)))
        for name, net in (("bias", bias_net), ("view", second_view)):
            right[name].append(predict_probs(net, images).argmax(1) == labels[start:stop])
    return paired_accuracy(torch.cat(right["bias"]), torch.cat(right["view"]))


def premise_verdict(
    transfer_z: float | None, premise_z: float, validation: dict[str, Any] | None, premise_val_z: float | None
) -> tuple[bool | None, str | None]:
    """Does the method's premise hold, and on which evidence? (holds, reason); (None, None) without a verdict.

    Two label-free signals that the bias model reads a shortcut plain training takes:
    - the edits: the second view (ERM) follows them to the style's class clearly more often than it keeps the
      content's (`transfer_z` ≥ `premise_z`);
    - the validation split: the bias model is more accurate than ERM there by more than `premise_val_z`
      standard errors (McNemar `validation["z"]`; one, as the selection margin rule), while ERM still leans
      towards the edits (`transfer_z` > 0).
    Either holds the premise; it fails when neither does. At CMNIST 5 % ERM follows the edits less clearly
    (z 1.6–2.8 on 3 of 5 seeds) but the bias model wins on validation (z 1.2–1.9 on those seeds); on the
    texture tree both fail (validation z −1.4 to −1.8). Where the two models are both fully biased (the
    background-colour and corner trees) they rarely disagree on validation (0–4 images, |z| ≤ 2), so the
    signal says little there and the edits decide.
    `premise_val_z` None turns the validation signal off (the edits alone decide, as before).
    """
    if transfer_z is None:
        return None, None
    if transfer_z >= premise_z:
        return True, "edits"
    val_z = None if validation is None or premise_val_z is None else validation.get("z")
    if val_z is not None and transfer_z > 0 and val_z > premise_val_z:
        return True, "validation"
    return False, None


def gate_folder(
    folder: Path,
    rows: list[dict[str, str]],
    judged: dict[str, torch.Tensor],
    enabled: bool,
    min_confidence: float,
    premise_z: float,
    min_retention: float = 0.5,
    validation: dict[str, Any] | None = None,
    premise_val_z: float | None = PREMISE_VAL_Z,
) -> dict[str, Any]:
    """Apply the gate and the premise check; write `gate.csv` and `manifest_accepted.csv`; the summary."""
    n = len(rows)
    per_sample = gate_samples(judged["p_style_class"], min_confidence)
    retention = round(float(judged["retained"].float().mean()), 6) if n else None
    content_lost = retention is not None and retention < min_retention
    has_view = n > 0 and bool((judged["view_synthetic"] >= 0).all())
    transfer = (
        second_view_transfer(
            judged["view_synthetic"], judged["view_content"], judged["view_style"], per_sample
        )
        if has_view
        else {"n": 0, "follows_style": None, "follows_content": None, "z": None}
    )
    follows, z = transfer["follows_style"], transfer["z"]
    premise_holds, premise_evidence = premise_verdict(z, premise_z, validation, premise_val_z)
    accepted = per_sample if enabled else torch.ones(n, dtype=torch.bool)
    if enabled and (premise_holds is False or content_lost):
        accepted = torch.zeros(n, dtype=torch.bool)
    with (folder / f".{GATE_FILENAME}.tmp").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(GATE_COLUMNS)
        for i, row in enumerate(rows):
            writer.writerow(
                [
                    row["index"],
                    f"{float(judged['p_style_class'][i]):.6f}",
                    int(judged["retained"][i]),
                    int(judged["view_synthetic"][i]),
                    int(accepted[i]),
                ]
            )
    os.replace(folder / f".{GATE_FILENAME}.tmp", folder / GATE_FILENAME)
    kept = [row for row, keep in zip(rows, accepted.tolist(), strict=True) if keep]
    write_manifest_atomic(folder / ACCEPTED_FILENAME, kept, MANIFEST_COLUMNS)
    rate = round(len(kept) / n, 6) if n else None
    if not enabled:
        verdict = "gate off: every synthetic image is used"
    elif premise_holds is False:
        on_val = ""
        if validation is not None and premise_val_z is not None:
            on_val = (
                "; nor is the bias model more accurate than it on the validation split "
                f"({validation['bias_acc']:.1%} against {validation['view_acc']:.1%}, "
                f"z = {validation['z']:.1f})"
            )
        verdict = (
            f"premise failed: on the images the bias model calls moved, an independently trained ERM model "
            f"moves to the style's class ({follows:.0%}) no more clearly than it keeps the content's "
            f"({transfer['follows_content']:.0%}; z = {z:.1f}, needs {premise_z:g}){on_val}; the bias model "
            "does not seem to read a shortcut plain training takes, so no synthetic image is used and the "
            "debiased model is plain training on the real images"
        )
    elif content_lost:
        verdict = (
            f"content lost: only {retention:.0%} of the synthetic images keep their content image's features "
            f"(needs {min_retention:.0%}); the generator replaced the contents instead of moving the bias "
            "attribute, so no synthetic image is used and the debiased model is plain training on the real "
            "images"
        )
    elif n and len(kept) < n / 2:
        verdict = (
            f"the gate rejected most of the synthetic set ({n - len(kept)} of {n}: the bias model was not "
            f"confident, p < {min_confidence:g}, that the attribute moved to the style's); only the "
            f"{len(kept)} accepted images are used"
        )
    else:
        verdict = f"{len(kept)} of {n} synthetic images accepted"
    return {
        "enabled": enabled,
        "num_rows": n,
        "accepted": len(kept),
        "accepted_rate": rate,
        "rejected_not_moved": int((judged["p_style_class"] < min_confidence).sum()),
        "content_retention": retention,
        "min_retention": min_retention,
        "content_lost": content_lost,
        "min_confidence": min_confidence,
        "premise": {
            "holds": premise_holds,
            "second_view_follows_style": follows,
            "second_view_follows_content": transfer["follows_content"],
            "n": transfer["n"],
            "z": z,
            "min_z": premise_z,
            "evidence": premise_evidence,
            "validation": validation,
            "min_val_z": premise_val_z,
        },
        "verdict": verdict,
    }
