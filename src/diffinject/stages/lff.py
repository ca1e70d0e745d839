"""Learning from Failure (Nam et al. 2020) as a LightningModule, following the reference code (research §8),
and `ReweightedDebiasModule`, the part LfF shares with DisEnt (`stages/disent.py`).

Two branches: a bias branch (LfF: the network f_B, `net_b`) trained with GCE to amplify the bias, and the
debiased branch (LfF: f_D, `net`, evaluated and checkpointed). Per step:
  1. per-sample CE of both branches, without gradient, folded into per-sample EMAs (α = 0.7; the first visit
     stores the raw loss);
  2. each EMA divided by its class-wise maximum over the whole training set;
  3. W = CE_b / (CE_b + CE_d + 1e-8), detached;
  4. loss = GCE(f_B).mean() + (CE(f_D) · W).mean(); one Adam steps both networks (equivalent to LfF's two
     Adams with equal settings, since Adam is per-parameter).
With `bias_ensemble` (LfF+BE, DisEnt+BE) a BiasEnsemble committee flags the bias-aligned training images at
the start of the fit (`stages/bias_ensemble.py`), and the bias branch trains on the flagged images only (plain
CE, as BiasEnsemble's `train_lff_be`); W still uses the bias branch's CE on every image.

DDP: the EMAs are indexed by dataset index and every rank keeps a full copy. Each step all-gathers the
batch's (index, label, CE_b, CE_d) from every rank and applies the same update everywhere, so the copies stay
identical and the class-wise maxima are global, exactly as on one device. The EMAs are plain tensors (not
registered buffers: DDP would re-broadcast them every forward) saved in the checkpoint for resuming.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from diffinject.measures.metrics import SELECTION_MARGIN_SE, SELECTION_MIN_GROUP
from diffinject.nets import build_classifier
from diffinject.stages.bias_ensemble import EnsembleOptions, ensure_committee
from diffinject.stages.classifiers import Batch, ClassifierModule
from diffinject.stages.losses import bias_branch_loss, check_gce_q, classwise_max, ema_update, lff_weights
from diffinject.stages.weights import CHECKPOINT_KEY


class ReweightedDebiasModule(ClassifierModule):
    """A bias branch and a debiased branch trained together; the debiased loss is weighted by relative
    difficulty W.

    Subclasses implement `training_step` (calling `lff_step_weights`, `bias_loss`, `log_train`) and
    `bias_model_logits`. Evaluation metrics and checkpoints are the debiased branch's (`self.net`).

    Args:
        selection_bias, selection_min_group: see `ClassifierModule`.
        q: GCE exponent of the bias branch (0.7).
        alpha: EMA momentum of the per-sample losses (0.7).
        bias_ensemble: BiasEnsemble options (`EnsembleOptions` keys, `{}` for the defaults) or None (off).
        if_no_synthetic: as a debias stage, what to do when the synthetic manifest it was given holds no image
            (the inject stage's gate accepted none): "erm" trains plain ERM on the real images
            (`ClassifierModule.no_synthetic_fallback`), "train" trains this method anyway.
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
        q: float = 0.7,
        alpha: float = 0.7,
        bias_ensemble: dict[str, Any] | None = None,
        if_no_synthetic: str = "train",
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
            selection_min_group,
            selection_margin_se,
        )
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"{type(self).__name__} alpha must be in [0, 1), got {alpha}")
        if if_no_synthetic not in ("train", "erm"):
            raise ValueError(
                f"{type(self).__name__} if_no_synthetic must be 'train' or 'erm', got {if_no_synthetic!r}"
            )
        self.fallback: str | None = None
        check_gce_q(q)
        self.ensemble = EnsembleOptions.parse(bias_ensemble)
        self.val_acc_b = MulticlassAccuracy(num_classes, average="micro")
        self.train_w_aligned = MeanMetric()
        self.train_w_conflicting = MeanMetric()
        self.num_train: int | None = None
        self.ema: dict[str, torch.Tensor] = {}
        self._restored_ema: dict[str, torch.Tensor] = {}
        self.aligned_flags: torch.Tensor | None = None  # BiasEnsemble's flags over dataset indices
        self.ensemble_info: dict[str, Any] = {}

    def bias_model_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The bias branch's prediction (validation monitoring only)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            datamodule = self.trainer.datamodule
            if datamodule is None or not hasattr(datamodule, "train_dataset"):
                raise ValueError(
                    f"{type(self).__name__} needs a data module with a train_dataset (per-sample EMAs)"
                )
            self.num_train = len(datamodule.train_dataset)
            if self.hparams.if_no_synthetic == "erm":
                self.fallback = self.no_synthetic_fallback()
                if self.fallback:
                    rank_zero_warn(f"{type(self).__name__}: {self.fallback}")

    def on_fit_start(self) -> None:
        """Allocate the per-sample state on the training device (restored when resuming); run or read the
        BiasEnsemble committee (cached in the run folder, so a resumed fit does not retrain it).

        A resumed checkpoint whose EMAs do not match the training set (another size: the data changed) is
        refused rather than skipped: fresh EMAs would restart every per-sample loss mid-training (first
        visit = raw loss) and change W from what an uninterrupted run computes, silently another method.
        """
        n = self.num_train or 0
        self.ema = {
            "loss_b": torch.zeros(n, device=self.device),
            "loss_d": torch.zeros(n, device=self.device),
            "seen_b": torch.zeros(n, device=self.device),
            "seen_d": torch.zeros(n, device=self.device),
            "label": torch.full((n,), -1, dtype=torch.long, device=self.device),
        }
        restored, self._restored_ema = self._restored_ema, {}
        wrong = {k: tuple(v.shape) for k, v in restored.items() if k in self.ema and v.shape != (n,)}
        if wrong:
            shapes = ", ".join(f"{k} {shape}" for k, shape in wrong.items())
            raise ValueError(
                f"{type(self).__name__}: the checkpoint being resumed holds per-sample loss EMAs for another "
                f"training set ({shapes}; this data module has {n} training images, shape ({n},)). Resume "
                "with the data it was trained on, or start the fit afresh (without --ckpt_path)"
            )
        for key, value in restored.items():
            if key in self.ema:
                self.ema[key].copy_(value.to(self.device))
        if self.ensemble is not None:
            self._start_ensemble(n)

    def _start_ensemble(self, num_train: int) -> None:
        h = self.hparams

        def make_net() -> torch.nn.Module:  # members: the plain classifier (BE's first-stage backbone)
            return build_classifier(h.arch, h.num_classes, h.in_channels, h.image_size, h.pretrained)

        # The committee draws from a forked RNG: the main run's random stream is the same whether the
        # committee was trained now or read from the cache.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            committee, info = ensure_committee(
                self.trainer.default_root_dir,
                self.ensemble,
                h.lr,
                make_net,
                self.trainer.datamodule,
                self.device,
                self.trainer,
            )
        self.aligned_flags = committee.flags_by_index(num_train).to(self.device)
        self.ensemble_info = info
        if self.logger is not None:  # bias labels were read for these numbers only
            metrics = info.get("metrics", {})
            values = {f"bias_ensemble/{k}": v for k, v in metrics.items() if isinstance(v, int | float)}
            self.logger.log_metrics(values, step=0)

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
                f"{type(self).__name__} needs indices 0..N-1 of the training split"
            )
        alpha = self.hparams.alpha
        ema_update(self.ema["loss_b"], self.ema["seen_b"], all_index, all_b, alpha)
        ema_update(self.ema["loss_d"], self.ema["seen_d"], all_index, all_d, alpha)
        self.ema["label"][all_index] = all_label
        c = self.hparams.num_classes
        max_b = classwise_max(self.ema["loss_b"], self.ema["label"], c)
        max_d = classwise_max(self.ema["loss_d"], self.ema["label"], c)
        return lff_weights(self.ema["loss_b"][index], self.ema["loss_d"][index], label, max_b, max_d)

    def bias_mask(self, batch: Batch) -> torch.Tensor | None:
        """Which batch items the bias branch learns from: all (None) or BiasEnsemble's flagged ones."""
        if self.aligned_flags is None:
            return None
        return self.aligned_flags[batch["index"].long()]

    def bias_loss(self, logits: torch.Tensor, label: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """GCE over the batch, or (BiasEnsemble) its `bias_loss` over the flagged items only."""
        kind = self.ensemble.bias_loss if self.ensemble is not None else "gce"
        return bias_branch_loss(logits, label, q=self.hparams.q, kind=kind, mask=mask)

    def log_train(self, terms: dict[str, torch.Tensor], weight: torch.Tensor, batch: Batch) -> None:
        """Loss terms (`loss` on the progress bar), mean W, flagged share, W on aligned/conflicting items."""
        size = batch["label"].numel()
        self.log("train/loss", terms.pop("loss"), on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        extras = {f"train/{k}": v for k, v in terms.items()}
        extras["train/weight"] = weight.mean()
        mask = self.bias_mask(batch)
        if mask is not None:
            extras["train/bias_flagged_frac"] = mask.float().mean()
        self.log_dict(extras, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
        # Monitoring only (bias labels never enter the loss): how strongly W up-weights conflicting items.
        label, bias = batch["label"], batch["bias"]
        # Updated unconditionally (possibly with nothing) so every rank computes and syncs alike.
        self.train_w_aligned.update(weight[bias == label])
        self.train_w_conflicting.update(weight[(bias >= 0) & (bias != label)])

    def on_train_epoch_end(self) -> None:
        if self.fallback:  # plain ERM: no weights were computed
            return
        for name, metric in (("aligned", self.train_w_aligned), ("conflicting", self.train_w_conflicting)):
            # NaN for an epoch without such items; compute() already synced the ranks
            self.log(f"train/weight_{name}", metric.compute(), sync_dist=True)
            metric.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self.val_acc_b.update(self.bias_model_logits(batch["image"]), batch["label"])

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.log("val/acc_bias_model", self.val_acc_b.compute(), sync_dist=True)
        self.val_acc_b.reset()

    def extra_metrics(self) -> dict[str, Any]:
        info = self.loaded_checkpoint.get("bias_ensemble", self.ensemble_info)
        return {"bias_ensemble": info} if info else {}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[CHECKPOINT_KEY]["lff_ema"] = {k: v.detach().cpu() for k, v in self.ema.items()}
        if self.ensemble_info:
            checkpoint[CHECKPOINT_KEY]["bias_ensemble"] = self.ensemble_info

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._restored_ema = dict(self.loaded_checkpoint.pop("lff_ema", {}))


class LfFClassifier(ReweightedDebiasModule):
    """LfF baseline (and LfF+BE with `bias_ensemble`). Metrics and checkpoints are those of f_D.

    Args: see `ReweightedDebiasModule`.
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
        q: float = 0.7,
        alpha: float = 0.7,
        bias_ensemble: dict[str, Any] | None = None,
        if_no_synthetic: str = "train",
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
            selection_min_group,
            selection_margin_se,
            q,
            alpha,
            bias_ensemble,
            if_no_synthetic,
        )
        self.net_b = build_classifier(arch, num_classes, in_channels, image_size, pretrained)

    def bias_model_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net_b(images)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.fallback:
            return self.plain_step(batch)
        images, label = batch["image"], batch["label"]
        logits_b, logits_d = self.net_b(images).float(), self.net(images).float()
        ce_b = F.cross_entropy(logits_b, label, reduction="none")
        ce_d = F.cross_entropy(logits_d, label, reduction="none")
        weight = self.lff_step_weights(batch, ce_b.detach(), ce_d.detach())
        loss_b = self.bias_loss(logits_b, label, self.bias_mask(batch))
        loss_d = (ce_d * weight).mean()
        loss = loss_b + loss_d
        self.log_train({"loss": loss, "loss_b": loss_b, "loss_d": loss_d}, weight, batch)
        return loss
