"""Classifier stages: the GCE-biased f_B (with top-K scoring) and Vanilla ERM; the debiased classifier
(`stages/debias.py`), LfF (`stages/lff.py`) and DisEnt (`stages/disent.py`) build on the same base.

All share `ClassifierModule`: one network from `build_classifier`, Adam, grouped val/test accuracy, checkpoint
selection on validation only (bias labels are read for reporting, never for training or selection), and a
`metrics.json` written into the run folder at test time.

Selection: `val/acc` by default; with `selection_bias` (the bias stage's checkpoint)
`val/acc_pseudo_balanced`, the mean validation accuracy over "the GCE bias model is right / wrong", soft
weights from its confidence (see `metrics.PseudoGroupAccuracy`): label-free, and it does not reward the
shortcut the way accuracy on a biased split does. When the pseudo-conflicting group is smaller than
`selection_min_group` effective images the score is noise, and `best.ckpt` is the last epoch instead
(`metrics.selection_fallback`). Otherwise the best epoch replaces the last one only when it scores more than
`selection_margin_se` standard errors above it (`metrics.keep_last_epoch`); both rules: `stages/selection.py`.
metrics.json records which rule chose the tested checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from diffinject.data.tempdirs import write_json_atomic
from diffinject.measures.metrics import (
    METRIC_NAMES,
    PSEUDO_BALANCED,
    PSEUDO_BALANCED_SE,
    PSEUDO_CONFLICTING_SIZE,
    SELECTION_MARGIN_SE,
    SELECTION_MIN_GROUP,
    GroupedAccuracy,
    PseudoGroupAccuracy,
    pseudo_balanced_se,
    selection_monitor,
    to_floats,
)
from diffinject.nets import build_classifier
from diffinject.stages.losses import check_gce_q, gce_loss
from diffinject.stages.selection import SelectionRule
from diffinject.stages.weights import CHECKPOINT_KEY, load_classifier_checkpoint

Batch = dict[str, torch.Tensor]


def checkpoint_dir(default_root_dir: str | os.PathLike[str]) -> Path:
    """Where every classifier stage keeps `best.ckpt` and `last.ckpt`."""
    return Path(default_root_dir) / "checkpoints"


def check_data_compatibility(hparams: Any, datamodule: Any) -> None:
    """Fail early, naming both values, when the model config and the data module disagree."""
    pairs = (("num_classes", "num_classes"), ("in_channels", "channels"), ("image_size", "image_size"))
    problems = []
    for model_key, data_key in pairs:
        data_value = getattr(datamodule, data_key, None)
        if data_value is not None and int(data_value) != int(hparams[model_key]):
            problems.append(f"model.{model_key}={hparams[model_key]} but data.{data_key}={data_value}")
    if problems:
        name = type(datamodule).__name__
        raise ValueError(f"model and data disagree ({name}): " + "; ".join(problems) + ". Fix the config.")


class ClassifierModule(SelectionRule, LightningModule):
    """Shared classifier stage. Subclasses implement `training_loss(logits, batch) -> per-sample loss`.

    Args:
        arch: "mlp" (LfF MLP 3×100) or "resnet18" (torchvision, from scratch unless `pretrained`).
        num_classes, in_channels, image_size: must match the data module (checked in `setup`).
        pretrained: ImageNet weights for resnet18 (must already be in the local torch hub cache).
        lr, weight_decay: Adam settings.
        num_bias_classes: number of bias values for the grouped metrics (default: num_classes).
        selection_bias: a bias-stage checkpoint (`{bias}/checkpoints/best.ckpt`); when set, `best.ckpt` is
            the epoch with the best `val/acc_pseudo_balanced` instead of `val/acc` (label-free either way).
        selection_min_group: with `selection_bias`, the fewest effective pseudo-conflicting validation images
            the pseudo-group rule needs; below it `best.ckpt` is the last epoch (0 = never fall back).
        selection_margin_se: with `selection_bias`, an earlier epoch replaces the last one as `best.ckpt`
            only when its score is more than this many standard errors above the last epoch's (0: the plain
            maximum).
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        num_bias_classes: int | None = None,
        selection_bias: str | None = None,
        selection_min_group: float = SELECTION_MIN_GROUP,
        selection_margin_se: float = SELECTION_MARGIN_SE,
    ) -> None:
        super().__init__()
        if selection_margin_se < 0:
            raise ValueError(f"selection_margin_se must be >= 0, got {selection_margin_se}")
        self.save_hyperparameters()
        self.net = self.build_net()
        bias_classes = num_bias_classes or num_classes
        self.val_metrics = GroupedAccuracy(num_classes, bias_classes)
        self.test_metrics = GroupedAccuracy(num_classes, bias_classes)
        self.val_pseudo = PseudoGroupAccuracy() if selection_bias else None
        # A plain list keeps the selection model out of state_dict, the optimiser and DDP.
        self._selection_net: list[nn.Module] = []
        self.val_summary: dict[str, float | None] = {}
        self.loaded_checkpoint: dict[str, Any] = {}
        self._best_checkpoint: list[ModelCheckpoint] = []
        self.selection: dict[str, Any] = {"rule": self.monitor}

    def build_net(self) -> nn.Module:
        """The evaluated network (DisEnt overrides it with its two-encoder network)."""
        h = self.hparams
        return build_classifier(h.arch, h.num_classes, h.in_channels, h.image_size, h.pretrained)

    @property
    def monitor(self) -> str:
        """The validation metric `best.ckpt` maximises."""
        return selection_monitor(self.hparams.get("selection_bias"))

    # -- hooks shared by every stage -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            check_data_compatibility(self.hparams, datamodule)
        path = self.hparams.get("selection_bias")
        if path and stage in ("fit", "validate") and not self._selection_net:
            net, _ = load_classifier_checkpoint(path, {"num_classes": self.hparams.num_classes})
            self._selection_net.append(net.eval().requires_grad_(False))
            rank_zero_info(f"{type(self).__name__}: selecting checkpoints on {PSEUDO_BALANCED} ({path})")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[Callback]:
        """`{default_root_dir}/checkpoints/best.ckpt` (best `self.monitor`) and `last.ckpt` (every epoch).

        `last.ckpt` comes from its own callback: with `save_last=True`, Lightning 2.6 refreshes last.ckpt only
        when a top-k checkpoint is saved, so it would hold the best epoch, not the last one.
        """
        folder = checkpoint_dir(self.trainer.default_root_dir)
        best = ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=self.monitor,
            mode="max",
            save_last=False,
            auto_insert_metric_name=False,
            enable_version_counter=False,
        )
        last = ModelCheckpoint(dirpath=folder, filename="last", monitor=None, enable_version_counter=False)
        self._best_checkpoint = [best]
        return [best, last]

    # -- training --------------------------------------------------------------------------------------
    def training_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def no_synthetic_fallback(self) -> str | None:
        """Why this fit should be plain ERM on the real images, or None.

        A debias stage whose data module was given a synthetic manifest that holds no image (the inject
        stage's gate accepted none, e.g. because its premise check failed) has nothing the method could add;
        its reweighting would then only amplify what the bias model got wrong. Then: plain cross-entropy,
        said in the log and in metrics.json (`fallback`).
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        manifest = getattr(datamodule, "synthetic_manifest", None)
        original = getattr(datamodule, "num_train_original", None)
        train = getattr(datamodule, "train_dataset", None)
        if not manifest or original is None or train is None or len(train) > int(original):
            return None
        return (
            f"the synthetic manifest {manifest} holds no usable image (the inject stage's gate accepted "
            "none: see injection_check.json next to it), so this stage trains plain ERM on the real images"
        )

    def plain_step(self, batch: Batch) -> torch.Tensor:
        """One ERM step of `self.net` (the fallback of `no_synthetic_fallback`)."""
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, batch_size=batch["label"].numel(), sync_dist=True
        )
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss = self.training_loss(logits, batch).mean()
        size = batch["label"].numel()
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        return loss

    # -- evaluation ------------------------------------------------------------------------------------
    def _eval_step(self, batch: Batch, metric: GroupedAccuracy, prefix: str) -> torch.Tensor:
        logits = self(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["label"])
        self.log(f"{prefix}/loss", loss, on_epoch=True, batch_size=batch["label"].numel(), sync_dist=True)
        metric.update(logits, batch["label"], batch["bias"])
        return logits

    def _eval_epoch_end(self, metric: GroupedAccuracy, prefix: str) -> dict[str, float | None]:
        values = metric.compute()  # synchronised over ranks by torchmetrics
        metric.reset()
        for name in METRIC_NAMES:  # equal on every rank already; sync_dist only keeps Lightning quiet
            self.log(f"{prefix}/{name}", values[name].float(), prog_bar=name == "acc", sync_dist=True)
        return to_floats(values, prefix=f"{prefix}/")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self._eval_step(batch, self.val_metrics, "val")
        if self.val_pseudo is not None and self._selection_net:
            bias_net = self._selection_net[0].to(self.device)
            self.val_pseudo.update(logits, batch["label"], bias_net(batch["image"]))

    def on_validation_epoch_end(self) -> None:
        summary = self._eval_epoch_end(self.val_metrics, "val")
        if self.val_pseudo is not None and self._selection_net:
            groups = self.val_pseudo.compute_groups()  # synchronised over ranks by torchmetrics
            self.val_pseudo.reset()
            values = {
                PSEUDO_BALANCED: groups["balanced"],
                PSEUDO_CONFLICTING_SIZE: groups["conflicting_size"],
                PSEUDO_BALANCED_SE: torch.tensor(pseudo_balanced_se(groups)),
            }
            for name, value in values.items():
                self.log(name, value.float(), sync_dist=True)
            summary.update(to_floats(values))
            if not self.trainer.sanity_checking:
                size = min(float(groups["conflicting_size"]), float(groups["wrong_count"]))
                self._apply_selection_fallback(size)
        if not self.trainer.sanity_checking:
            self.val_summary = {**summary, "epoch": self.current_epoch, "step": self.global_step}

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        # Under DDP the DistributedSampler pads with repeats: test on one device for exact counts.
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        groups = self.test_metrics.group_counts()  # before the reset in _eval_epoch_end; on every rank
        summary = self._eval_epoch_end(self.test_metrics, "test")
        if self.trainer.is_global_zero:
            self.write_metrics(summary, groups)

    def write_metrics(
        self, test_summary: dict[str, float | None], test_groups: dict[str, Any] | None = None
    ) -> Path:
        """`metrics.json` in the run folder: test metrics + the val metrics of the tested checkpoint, and the
        test images' correct/total counts per (label, bias) group (`test_groups`, for the report)."""
        val = self.loaded_checkpoint.get("val", self.val_summary)
        payload: dict[str, Any] = {
            "stage": type(self).__name__,
            "test": test_summary,
            "test_groups": test_groups,
            "val": val or None,
            "checkpoint": str(self.trainer.ckpt_path) if self.trainer.ckpt_path else None,
            "checkpoint_epoch": self.loaded_checkpoint.get("epoch"),
            "selection": self.loaded_checkpoint.get("selection", self.selection),
            "fallback": self.loaded_checkpoint.get("fallback", getattr(self, "fallback", None)),
            "seed": int(os.environ["PL_GLOBAL_SEED"]) if "PL_GLOBAL_SEED" in os.environ else None,
            "hparams": {k: v for k, v in self.hparams.items() if not str(k).startswith("_")},
            **self.extra_metrics(),
        }
        path = Path(self.trainer.default_root_dir) / "metrics.json"
        write_json_atomic(path, payload)
        rank_zero_info(f"wrote {path}: test/acc={test_summary.get('test/acc')}")
        return path

    def extra_metrics(self) -> dict[str, Any]:
        """Stage-specific entries for metrics.json."""
        return {}

    # -- checkpoints: keep the selected epoch's validation metrics with the weights ---------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "val": dict(self.val_summary),
            "epoch": self.current_epoch,
            "selection": dict(self.selection),
            "fallback": getattr(self, "fallback", None),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_checkpoint = dict(checkpoint.get(CHECKPOINT_KEY, {}))


class VanillaClassifier(ClassifierModule):
    """ERM baseline: plain cross-entropy on the biased training set."""

    def training_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["label"], reduction="none")


class BiasClassifier(ClassifierModule):
    """f_B: a deliberately biased classifier trained with GCE; `predict` scores training images with plain CE.

    Args:
        q: GCE exponent (0.7 as in LfF/DiffInject).
        weights: path to a `BiasClassifier` checkpoint (the bias fit stage's `checkpoints/best.ckpt`),
            loaded in `setup`; the top-K config uses it: stages hand over files, never Trainer `ckpt_path`.
    """

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        pretrained: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        num_bias_classes: int | None = None,
        q: float = 0.7,
        weights: str | None = None,
    ) -> None:
        check_gce_q(q)  # at construction: a bad q would otherwise fail at the first training step
        super().__init__(
            arch, num_classes, in_channels, image_size, pretrained, lr, weight_decay, num_bias_classes
        )
        self._weights_loaded = False

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.weights and not self._weights_loaded:
            self.load_weights(self.hparams.weights)

    def on_predict_start(self) -> None:
        # Checked here, not in setup: Trainer restores a --ckpt_path only after setup.
        if not self._weights_loaded and self.trainer.ckpt_path is None:
            raise ValueError(
                "BiasClassifier predict needs trained weights: set model.init_args.weights to the bias "
                "stage's checkpoints/best.ckpt (run `diffinject fit --config configs/<dataset>/bias.yaml` "
                "first)"
            )

    def load_weights(self, path: str) -> None:
        """Load the network weights of a BiasClassifier checkpoint, checking that the architecture matches."""
        keys = ("arch", "num_classes", "in_channels", "image_size")
        net, extras = load_classifier_checkpoint(path, {key: self.hparams[key] for key in keys})
        self.net.load_state_dict(net.state_dict())
        self.loaded_checkpoint = extras
        self._weights_loaded = True
        rank_zero_info(f"BiasClassifier: loaded weights from {path}")

    def training_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return gce_loss(logits, batch["label"], q=self.hparams.q)

    def predict_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        """Per-sample plain CE (the top-K score), with label, bias (evaluation only) and dataset index."""
        logits = self(batch["image"])
        return {
            "index": batch["index"],
            "label": batch["label"],
            "bias": batch["bias"],
            "loss": F.cross_entropy(logits.float(), batch["label"], reduction="none"),
        }
