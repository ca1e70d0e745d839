"""`InjectionCheck`: the label-free injection check (`measures.injection_check`) after every inject run.

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

The gate (`gate`, on in the pipeline's configs) then judges every finished sample and decides what the
debias stage trains on: `callbacks/gate.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from diffinject.callbacks.gate import (
    PREMISE_VAL_Z,
    PREMISE_Z,
    gate_folder,
    judge_rows,
    training_images,
    validation_comparison,
)
from diffinject.callbacks.synthetic_writer import collect_rows
from diffinject.data.tempdirs import write_json_atomic
from diffinject.measures.injection_check import (
    DEFAULT_FEATURE_T,
    injection_check,
)
from diffinject.measures.synthetic_set import load_images
from diffinject.stages.weights import load_classifier_checkpoint

CHECK_FILENAME = "injection_check.json"
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
        premise_val_z: or, with the second view still leaning towards the edits, when the bias model is more
            accurate than it on the validation split by more than this McNemar z (`gate.premise_verdict`);
            None: the edits alone decide.
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
        premise_val_z: float | None = PREMISE_VAL_Z,
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
        self.premise_val_z = premise_val_z
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
        second_view, validation = None, None
        if self.second_view_checkpoint is not None:
            second_view, _ = load_classifier_checkpoint(self.second_view_checkpoint, expect)
            second_view = second_view.to(pl_module.device).eval().requires_grad_(False)
            val_dataset = getattr(datamodule.data, "val_dataset", None)
            if self.gate and self.premise_val_z is not None and val_dataset is not None:
                validation = validation_comparison(bias_net, second_view, val_dataset)
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
            validation,
            self.premise_val_z,
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
            "definitions": "see diffinject/measures/injection_check.py; no labels are read",
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
