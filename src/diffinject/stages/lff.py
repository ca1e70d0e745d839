"""Learning from Failure (Nam et al. 2020) as a LightningModule, following the reference code (research §8).

Two networks of the same architecture: f_B (`net_b`, trained with GCE to amplify the bias) and f_D (`net`,
the debiased model that is evaluated and checkpointed). Per step:
  1. per-sample CE of both, without gradient, folded into per-sample EMAs (α = 0.7; the first visit
     stores the raw loss);
  2. each EMA divided by its class-wise maximum over the whole training set;
  3. W = CE_b / (CE_b + CE_d + 1e-8), detached;
  4. loss = GCE(f_B).mean() + (CE(f_D) · W).mean(); one Adam steps both networks (equivalent to LfF's two
     Adams with equal settings, since Adam is per-parameter).

DDP: the EMAs are indexed by dataset index and every rank keeps a full copy. Each step all-gathers the
batch's (index, label, CE_b, CE_d) from every rank and applies the same update everywhere, so the copies stay
identical and the class-wise maxima are global, exactly as on one device. The EMAs are plain tensors (not
registered buffers: DDP would re-broadcast them every forward) saved in the checkpoint for resuming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from diffinject.losses import classwise_max, ema_update, gce_loss, lff_weights
from diffinject.nets import build_classifier
from diffinject.stages.classifiers import Batch, ClassifierModule
from diffinject.stages.weights import CHECKPOINT_KEY


class LfFClassifier(ClassifierModule):
    """LfF baseline. Evaluation metrics and checkpoints are those of the debiased network f_D.

    Args:
        selection_bias: see `ClassifierModule` (checkpoint selection on pseudo-group balanced accuracy).
        q: GCE exponent for f_B (0.7).
        alpha: EMA momentum of the per-sample losses (0.7).
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
        q: float = 0.7,
        alpha: float = 0.7,
    ) -> None:
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
        )
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"LfF alpha must be in [0, 1), got {alpha}")
        self.net_b = build_classifier(arch, num_classes, in_channels, image_size, pretrained)
        self.val_acc_b = MulticlassAccuracy(num_classes, average="micro")
        self.train_w_aligned = MeanMetric()
        self.train_w_conflicting = MeanMetric()
        self.num_train: int | None = None
        self.ema: dict[str, torch.Tensor] = {}
        self._restored_ema: dict[str, torch.Tensor] = {}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_dataset"):
                raise ValueError("LfFClassifier needs a data module with a train_dataset (per-sample EMAs)")
            self.num_train = len(datamodule.train_dataset)

    def on_fit_start(self) -> None:
        """Allocate the per-sample state on the training device (restored when resuming)."""
        n = self.num_train or 0
        self.ema = {
            "loss_b": torch.zeros(n, device=self.device),
            "loss_d": torch.zeros(n, device=self.device),
            "seen_b": torch.zeros(n, device=self.device),
            "seen_d": torch.zeros(n, device=self.device),
            "label": torch.full((n,), -1, dtype=torch.long, device=self.device),
        }
        restored = self._restored_ema
        if restored and all(restored[k].shape == self.ema[k].shape for k in self.ema if k in restored):
            for key, value in restored.items():
                self.ema[key].copy_(value.to(self.device))
        self._restored_ema = {}

    def _gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Concatenate each tensor over ranks (identity on one device); equal per-rank batch sizes assumed."""
        if self.trainer.world_size == 1:
            return tensors
        return tuple(self.all_gather(t).reshape(-1) for t in tensors)

    def lff_step_weights(self, batch: Batch, ce_b: torch.Tensor, ce_d: torch.Tensor) -> torch.Tensor:
        """Update the EMAs with this step's (all-rank) losses and return W for the local batch."""
        index, label = batch["index"].long(), batch["label"].long()
        all_index, all_label, all_b, all_d = self._gather(index, label, ce_b, ce_d)
        if all_index.numel() and int(all_index.max()) >= self.ema["loss_b"].numel():
            raise IndexError(
                f"item index {int(all_index.max())} >= training set size {self.ema['loss_b'].numel()}: "
                "LfF needs indices 0..N-1 of the training split"
            )
        alpha = self.hparams.alpha
        ema_update(self.ema["loss_b"], self.ema["seen_b"], all_index, all_b, alpha)
        ema_update(self.ema["loss_d"], self.ema["seen_d"], all_index, all_d, alpha)
        self.ema["label"][all_index] = all_label
        c = self.hparams.num_classes
        max_b = classwise_max(self.ema["loss_b"], self.ema["label"], c)
        max_d = classwise_max(self.ema["loss_d"], self.ema["label"], c)
        return lff_weights(self.ema["loss_b"][index], self.ema["loss_d"][index], label, max_b, max_d)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, label = batch["image"], batch["label"]
        logits_b, logits_d = self.net_b(images).float(), self.net(images).float()
        ce_b = F.cross_entropy(logits_b, label, reduction="none")
        ce_d = F.cross_entropy(logits_d, label, reduction="none")
        weight = self.lff_step_weights(batch, ce_b.detach(), ce_d.detach())
        loss_b = gce_loss(logits_b, label, q=self.hparams.q).mean()
        loss_d = (ce_d * weight).mean()
        loss = loss_b + loss_d

        size = label.numel()
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size, sync_dist=True
        )
        self.log_dict(
            {"train/loss_b": loss_b, "train/loss_d": loss_d, "train/weight": weight.mean()},
            on_step=False,
            on_epoch=True,
            batch_size=size,
            sync_dist=True,
        )
        # Monitoring only (bias labels never enter the loss): how strongly LfF up-weights conflicting items.
        conflicting = (batch["bias"] >= 0) & (batch["bias"] != label)
        aligned = batch["bias"] == label
        # Updated unconditionally (possibly with nothing) so every rank computes and syncs alike.
        self.train_w_aligned.update(weight[aligned])
        self.train_w_conflicting.update(weight[conflicting])
        return loss

    def on_train_epoch_end(self) -> None:
        for name, metric in (("aligned", self.train_w_aligned), ("conflicting", self.train_w_conflicting)):
            # NaN for an epoch without such items; compute() already synced the ranks
            self.log(f"train/weight_{name}", metric.compute(), sync_dist=True)
            metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_acc_b.update(self.net_b(batch["image"]), batch["label"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/acc_bias_model", self.val_acc_b.compute(), sync_dist=True)
        self.val_acc_b.reset()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["lff_ema"] = {k: v.detach().cpu() for k, v in self.ema.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored_ema = dict(self.loaded_checkpoint.pop("lff_ema", {}))
