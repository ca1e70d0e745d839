"""`InjectionCheck`: the label-free injection check (`diffinject.injection_check`) after every inject run.

It reads what the run left on disk, not the predictions in memory: the rows of `{output_dir}/manifest.csv`
(and any per-rank shard not merged yet) whose PNG exists, sorted by sample index, the first `max_samples` of
them (a deterministic subset: each sample's pair is drawn from its own seed), the synthetic PNGs, and the
content and style images of those rows from the data module's training split. Features come from the run's
own U-Net (`pl_module.unet`), the bias model from the seed's bias stage (`checkpoints/best.ckpt`). It writes
`{output_dir}/injection_check.json` and logs `check/<figure>` at step 0 to every logger.

Resume: the check is recomputed at the end of *every* predict run from the files on disk, including a rerun
that had nothing left to generate (Lightning skips the predict loop then, so this runs in `teardown`, which
every run reaches). It is deterministic (fixed subset, t fixed, no noise), so a rerun of a finished set
rewrites the same numbers, and a set completed after an interruption gets figures over the complete set.
It costs a few encoder passes over at most 3 × `max_samples` images (about a second for CMNIST on a CPU).

The gate (`gate`, on in the pipeline's configs) then reads *every* finished sample and decides what the debias
stage trains on, written as `manifest_accepted.csv` (the manifest's rows that pass, same columns) and
`gate.csv` (one line per sample: the figures it was judged on):
- per sample (`injection_check.gate_samples`): the bias model gives the style's class probability ≥
  `gate_min_confidence` on the synthetic image;
- per set, **content**: when fewer than `gate_min_retention` of the images keep their content (closer to the
  content's bottleneck features than to the style's), the generator replaced the contents rather than moving
  an attribute, and nothing is accepted;
- per set, the **premise check** (`injection_check.second_view_transfer`, with `second_view_checkpoint`, the
  seed's Vanilla ERM model): on the images the per-image test accepts, does an independently trained ERM
  model follow the edit to the style's class clearly more often than it keeps the content's? When the
  difference is below `premise_z` standard errors,
  the bias model's attribute is not a shortcut plain training takes (or the edit only fooled the bias
  model), the method's premise does not hold, and nothing is accepted: the debias stage then trains plainly
  on the real images (`if_no_synthetic: erm`) and the summary and the report say why.
With the gate off every sample is accepted (and still judged, for the report).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS, collect_rows, write_manifest_atomic
from diffinject.injection_check import (
    DEFAULT_FEATURE_T,
    bottleneck_h,
    content_scores,
    gate_samples,
    injection_check,
    predict_probs,
    second_view_transfer,
)
from diffinject.report.analysis import load_images
from diffinject.stages.weights import load_classifier_checkpoint

CHECK_FILENAME = "injection_check.json"
ACCEPTED_FILENAME = "manifest_accepted.csv"
GATE_FILENAME = "gate.csv"
GATE_COLUMNS = ("index", "p_style_class", "retained", "second_view_class", "accepted")
#: images per chunk of the gate (bounds memory on large images)
GATE_CHUNK = 512
#: default premise threshold, in standard errors (`injection_check.second_view_transfer`; measured values in
#: docs/results/bias-trees.md)
PREMISE_Z = 3.5
KNOWN_DATASETS = ("cmnist", "ccifar10", "bffhq", "dogscats")


def bias_stage_hint(path: Path) -> str:
    """The command that writes a bias checkpoint, with the dataset guessed from the path when it names one."""
    dataset = next((part for part in path.parts if part in KNOWN_DATASETS), "<dataset>")
    return f"diffinject fit --config configs/{dataset}/bias.yaml"


def check_bias_checkpoint(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"InjectionCheck: bias checkpoint {path} not found. The bias stage writes it "
            f"(`{bias_stage_hint(path)}` → <bias folder>/checkpoints/best.ckpt); run it first, or point "
            "bias_checkpoint at the seed's bias folder"
        )


def training_images(dataset: Any, indices: list[int]) -> torch.Tensor:
    """Float [0, 1] N×C×H×W of training items, rounded to the uint8 grid the synthetic PNGs are stored on."""
    images = torch.stack([dataset[int(i)]["image"].float() for i in indices])
    return (images * 255.0).round().clamp(0, 255) / 255.0


def check_folder(
    output_dir: str | Path,
    bias_net: nn.Module,
    unet: nn.Module,
    model_size: int,
    train_dataset: Any,
    max_samples: int = 512,
    feature_t: int = DEFAULT_FEATURE_T,
) -> dict[str, Any]:
    """The check over the first `max_samples` finished samples of an inject folder (see module doc)."""
    folder = Path(output_dir)
    rows = [row for _, row in sorted(collect_rows(folder).items())]
    subset = rows[:max_samples]
    result: dict[str, Any] = {"num_rows": len(rows)}
    if not subset:
        return {"n": 0, "feature_t": int(feature_t), **result}
    channels = int(train_dataset[0]["image"].shape[0])
    synthetic = torch.from_numpy(load_images([folder / r["path"] for r in subset], channels)).float() / 255.0
    content = training_images(train_dataset, [int(r["content_index"]) for r in subset])
    style = training_images(train_dataset, [int(r["style_index"]) for r in subset])
    figures = injection_check(bias_net, unet, synthetic, content, style, model_size, feature_t)
    return {**figures, **result}


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


def gate_folder(
    folder: Path,
    rows: list[dict[str, str]],
    judged: dict[str, torch.Tensor],
    enabled: bool,
    min_confidence: float,
    premise_z: float,
    min_retention: float = 0.5,
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
    premise_holds = None if z is None else bool(z >= premise_z)
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
        verdict = (
            f"premise failed: on the images the bias model calls moved, an independently trained ERM model "
            f"moves to the style's class ({follows:.0%}) no more clearly than it keeps the content's "
            f"({transfer['follows_content']:.0%}; z = {z:.1f}, needs {premise_z:g}); the bias model does not "
            "seem to read a shortcut plain training takes, so no synthetic image is used and the debiased "
            "model is plain training on the real images"
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
        },
        "verdict": verdict,
    }


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


class InjectionCheck(Callback):
    """Label-free injection check of an inject (`predict`) run: `{output_dir}/injection_check.json` + logs.

    Args:
        bias_checkpoint: the seed's bias model, `<bias folder>/checkpoints/best.ckpt` (GCE bias stage).
        output_dir: the inject folder (the `SyntheticImageWriter`'s `output_dir`).
        max_samples: check the first this many finished samples (by sample index).
        feature_t: timestep at which the U-Net encoder reads the clean images for content retention.
        gate: judge every sample and accept only those that pass (else all are accepted); see module doc.
        gate_min_confidence: the bias model's probability of the style's class a synthetic image needs.
        gate_min_retention: the share of a set that must keep its content, else nothing is accepted.
        second_view_checkpoint: the seed's Vanilla ERM checkpoint for the premise check (None: no check).
        premise_z: the premise holds when, on the edits the bias model sees, the second view moves to the
            style's class more often than it keeps the content's by at least this many standard errors.
    """

    def __init__(
        self,
        bias_checkpoint: str,
        output_dir: str,
        max_samples: int = 512,
        feature_t: int = DEFAULT_FEATURE_T,
        gate: bool = False,
        gate_min_confidence: float = 0.9,
        gate_min_retention: float = 0.5,
        second_view_checkpoint: str | None = None,
        premise_z: float = PREMISE_Z,
    ) -> None:
        super().__init__()
        if max_samples < 1:
            raise ValueError(f"InjectionCheck max_samples must be >= 1, got {max_samples}")
        for name, value in (
            ("gate_min_confidence", gate_min_confidence),
            ("gate_min_retention", gate_min_retention),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"InjectionCheck {name} must be in [0, 1], got {value}")
        self.gate = gate
        self.gate_min_confidence = gate_min_confidence
        self.gate_min_retention = gate_min_retention
        self.second_view_checkpoint = Path(second_view_checkpoint) if second_view_checkpoint else None
        self.premise_z = premise_z
        self.bias_checkpoint = Path(bias_checkpoint)
        self.output_dir = Path(output_dir)
        self.max_samples = max_samples
        self.feature_t = feature_t
        self.result: dict[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        # before any image is generated: a missing bias model must not cost a whole injection run
        check_bias_checkpoint(self.bias_checkpoint)
        if self.second_view_checkpoint is not None and not self.second_view_checkpoint.is_file():
            raise FileNotFoundError(
                f"InjectionCheck: second_view_checkpoint {self.second_view_checkpoint} not found; it is the "
                "seed's Vanilla model (<vanilla folder>/checkpoints/best.ckpt): run that stage first, or set "
                "second_view_checkpoint: null to skip the premise check"
            )
        source = getattr(trainer.datamodule, "data", None)
        if source is None or not hasattr(pl_module, "unet") or not hasattr(pl_module, "model_size"):
            raise TypeError(
                "InjectionCheck runs in the inject stage: it needs InjectionPredictModule (model.class_path) "
                "and InjectionPairsDataModule (data.class_path), got "
                f"{type(pl_module).__name__} and {type(trainer.datamodule).__name__}"
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # teardown, not on_predict_end: a rerun with nothing left to generate skips the predict loop and its
        # end hooks; the barrier makes every rank's images visible before rank 0 reads them.
        if stage != "predict":
            return
        trainer.strategy.barrier("injection_check_start")
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                self.result = self.run(trainer, pl_module)
            except Exception as caught:  # re-raised after the barrier, so other ranks do not hang
                error = caught
        trainer.strategy.barrier("injection_check_done")
        if error is not None:
            raise error

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        check_bias_checkpoint(self.bias_checkpoint)
        datamodule = trainer.datamodule
        expect = {
            "num_classes": int(datamodule.num_classes),
            "in_channels": int(datamodule.channels),
            "image_size": int(datamodule.image_size),
        }
        bias_net, _ = load_classifier_checkpoint(self.bias_checkpoint, expect)
        bias_net = bias_net.to(pl_module.device).eval().requires_grad_(False)
        figures = check_folder(
            self.output_dir,
            bias_net,
            pl_module.unet,
            int(pl_module.model_size),
            datamodule.data.train_eval_dataset,
            self.max_samples,
            self.feature_t,
        )
        rows = [row for _, row in sorted(collect_rows(self.output_dir).items())]
        second_view = None
        if self.second_view_checkpoint is not None:
            second_view, _ = load_classifier_checkpoint(self.second_view_checkpoint, expect)
            second_view = second_view.to(pl_module.device).eval().requires_grad_(False)
        judged = judge_rows(
            self.output_dir,
            rows,
            bias_net,
            pl_module.unet,
            int(pl_module.model_size),
            datamodule.data.train_eval_dataset,
            second_view,
            self.feature_t,
        )
        gate = gate_folder(
            self.output_dir,
            rows,
            judged,
            self.gate,
            self.gate_min_confidence,
            self.premise_z,
            self.gate_min_retention,
        )
        plan = getattr(datamodule, "plan", None)
        payload = {
            **figures,
            "gate": gate,
            "complete": plan is not None and figures["num_rows"] == len(plan),
            "max_samples": self.max_samples,
            "subset": "the first n finished samples by index",
            "bias_checkpoint": str(self.bias_checkpoint),
            "unet": str(pl_module.hparams.get("unet", "")),
            "unet_global_step": getattr(pl_module, "info", {}).get("global_step"),
            "definitions": "see diffinject/injection_check.py; no labels are read",
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output_dir / CHECK_FILENAME, payload)
        if payload["n"] == 0:
            rank_zero_warn(f"InjectionCheck: no finished samples in {self.output_dir}; nothing to check")
            return payload
        metrics = {f"check/{k}": float(v) for k, v in figures.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=0)
        print(  # rank 0 only (called from teardown on global zero)
            f"InjectionCheck: n={payload['n']} bias_moved={payload['bias_moved']:.3f} "
            f"bias_kept_content={payload['bias_kept_content']:.3f} "
            f"content_retention={payload['content_retention']:.3f} "
            f"moved_and_retained={payload['moved_and_retained']:.3f} → {self.output_dir / CHECK_FILENAME}\n"
            f"InjectionCheck gate: {gate['verdict']}",
            flush=True,
        )
        if gate["enabled"] and gate["accepted"] < gate["num_rows"] / 2:
            rank_zero_warn(f"InjectionCheck: {gate['verdict']}")
        return payload
