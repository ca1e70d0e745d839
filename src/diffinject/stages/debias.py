"""The debiased classifier: trained on the original training split ∪ the inject stage's synthetic images."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffinject.measures.metrics import SELECTION_MARGIN_SE, SELECTION_MIN_GROUP
from diffinject.stages.classifiers import Batch, ClassifierModule
from diffinject.stages.losses import check_gce_q, gce_loss
from diffinject.stages.weights import CHECKPOINT_KEY


class DebiasClassifier(ClassifierModule):
    """Final classifier on original ∪ synthetic data (data module's `synthetic_manifest`).

    Args:
        loss: "ce" (default) or "gce".
        q: GCE exponent when loss="gce".
        require_synthetic: fail when the data module is given no synthetic manifest (a missing manifest would
            otherwise silently turn this into the Vanilla baseline).
        if_no_synthetic: when the manifest it was given holds no image (the inject stage's gate accepted
            none): "erm" trains plain cross-entropy on the real images, "train" keeps the configured loss.
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
        loss: str = "ce",
        q: float = 0.7,
        require_synthetic: bool = True,
        if_no_synthetic: str = "erm",
    ) -> None:
        if if_no_synthetic not in ("train", "erm"):
            raise ValueError(
                f"DebiasClassifier if_no_synthetic must be 'train' or 'erm', got {if_no_synthetic!r}"
            )
        if loss not in ("ce", "gce"):
            raise ValueError(f"DebiasClassifier loss must be 'ce' or 'gce', got {loss!r}")
        check_gce_q(q)
        super().__init__(
            arch,
            num_classes,
            in_channels,
            image_size,
            pretrained,
            lr,
            weight_decay,
            num_bias_classes,
            selection_bias,
            selection_min_group,
            selection_margin_se,
        )
        self.num_original: int | None = None
        self.num_synthetic: int | None = None
        self.fallback: str | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "num_train_original"):
            raise ValueError("DebiasClassifier needs a BiasedDataModule (with num_train_original) as data")
        self.num_original = int(datamodule.num_train_original)
        self.num_synthetic = len(datamodule.train_dataset) - self.num_original
        rank_zero_info(
            f"DebiasClassifier: training on {self.num_original} original + "
            f"{self.num_synthetic} synthetic items"
        )
        self.fallback = self.no_synthetic_fallback() if self.hparams.if_no_synthetic == "erm" else None
        if self.fallback:  # a manifest was given but the gate accepted nothing: plain ERM, said loudly
            rank_zero_warn(f"DebiasClassifier: {self.fallback}")
        elif self.num_synthetic <= 0 and not getattr(datamodule, "synthetic_manifest", None):
            message = (
                "DebiasClassifier: the training set has no synthetic items; set "
                "data.init_args.synthetic_manifest to the inject stage's manifest.csv"
            )
            if self.hparams.require_synthetic:
                raise ValueError(message + " (or model.init_args.require_synthetic: false for an ablation)")
            rank_zero_warn(message)

    def training_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        if self.fallback:
            return F.cross_entropy(logits.float(), batch["label"], reduction="none")
        if self.num_original is not None:
            synthetic = (batch["index"] >= self.num_original).float().mean()
            self.log(
                "train/synthetic_frac", synthetic, on_step=False, on_epoch=True, batch_size=logits.shape[0]
            )
        if self.hparams.loss == "gce":
            return gce_loss(logits, batch["label"], q=self.hparams.q)
        return F.cross_entropy(logits.float(), batch["label"], reduction="none")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY].update(num_original=self.num_original, num_synthetic=self.num_synthetic)

    def extra_metrics(self) -> dict[str, Any]:
        saved = self.loaded_checkpoint
        return {
            "num_train_original": saved.get("num_original", self.num_original),
            "num_train_synthetic": saved.get("num_synthetic", self.num_synthetic),
        }
