"""DisEnt (Lee et al. 2021, "Learning Debiased Representation via Disentangled Feature Augmentation").

Following kakaoenterprise/Learning-Debiased-Disentangled @7626f36 (`learner.py:train_ours`): an intrinsic
encoder E_i and a bias encoder E_b give z = [z_i, z_b]; the intrinsic head C_i sees [z_i, z_b.detach()], the
bias head C_b sees [z_i.detach(), z_b], so neither encoder learns through the other's head.
  W    = LfF's relative difficulty from per-sample EMAs of CE(C_b) and CE(C_i) (class-wise max normalised);
  L_dis  = mean(W · CE(C_i(z), y)) + λ_dis_align · mean(GCE(C_b(z), y));
  L_swap = mean(W · CE(C_i(z_swap), y)) + λ_swap_align · mean(GCE(C_b(z_swap), ỹ)), z_swap = [z_i, z_b[π]],
           ỹ = y[π] for a random permutation π of the batch — only from step `swap_start` on (before: 0);
  loss = L_dis + λ_swap · L_swap.
At test time the prediction is C_i([z_i, z_b]). The learning rate is multiplied by `lr_gamma` every
`lr_decay_step` steps counted from `swap_start` (the reference steps its StepLR only once step ≥ curr_step).
With `bias_ensemble` (DisEnt+BE, BiasEnsemble's `train_disent_be`) both bias-head terms use only the flagged
images — for the swap term, the images whose z_b was swapped in — with plain CE.

The per-sample EMAs, BiasEnsemble, monitoring and checkpoint state are shared with LfF
(`stages/lff.py:ReweightedDebiasModule`); the loss terms are the pure function `disent_loss_terms`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from diffinject.measures.metrics import SELECTION_MARGIN_SE, SELECTION_MIN_GROUP
from diffinject.nets import DisEntNet
from diffinject.stages.classifiers import Batch
from diffinject.stages.lff import ReweightedDebiasModule


def disent_lr_factor(step: int, start: int, every: int | None, gamma: float) -> float:
    """LR factor at optimizer step `step`: gamma ** floor(max(0, step − start) / every); 1 without decay."""
    if not every:
        return 1.0
    return gamma ** (max(0, step - start) // every)


def disent_loss_terms(
    net: DisEntNet,
    z_i: torch.Tensor,
    z_b: torch.Tensor,
    label: torch.Tensor,
    weight: torch.Tensor,
    bias_loss: Any,
    perm: torch.Tensor | None,
    mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """DisEnt's four loss terms (means, before the λs) for features (z_i, z_b) and relative difficulty W.

    `bias_loss(logits, target, mask) -> scalar` is the bias head's loss (GCE, or CE over BiasEnsemble's
    flagged items). `perm`: the swap permutation, or None before the swap starts (swap terms are then 0).
    """
    z_conflict = torch.cat((z_i, z_b.detach()), dim=1)
    z_align = torch.cat((z_i.detach(), z_b), dim=1)
    logits_i, logits_b = net.head_i(z_conflict).float(), net.head_b(z_align).float()
    terms = {
        "dis_i": (F.cross_entropy(logits_i, label, reduction="none") * weight).mean(),
        "dis_b": bias_loss(logits_b, label, mask),
    }
    zero = logits_i.new_zeros(())
    if perm is None:
        return {**terms, "swap_i": zero, "swap_b": zero}
    z_b_swap, label_swap = z_b[perm], label[perm]
    mask_swap = mask[perm] if mask is not None else None
    logits_swap_i = net.head_i(torch.cat((z_i, z_b_swap.detach()), dim=1)).float()
    logits_swap_b = net.head_b(torch.cat((z_i.detach(), z_b_swap), dim=1)).float()
    terms["swap_i"] = (F.cross_entropy(logits_swap_i, label, reduction="none") * weight).mean()
    terms["swap_b"] = bias_loss(logits_swap_b, label_swap, mask_swap)
    return terms


class DisEntClassifier(ReweightedDebiasModule):
    """DisEnt (and DisEnt+BE with `bias_ensemble`). Metrics and checkpoints are the intrinsic classifier's.

    Args (besides `ReweightedDebiasModule`'s; reference Colored MNIST values in brackets):
        swap_start: first optimizer step (0-based) with feature swapping [10,000 of 50,000].
        lambda_swap: weight of L_swap [1].
        lambda_dis_align: weight of the bias head's GCE in L_dis [10].
        lambda_swap_align: weight of the bias head's GCE in L_swap [10].
        lr_decay_step: multiply the lr by `lr_gamma` every this many steps after `swap_start` [10,000];
            None = constant lr.
        lr_gamma: the decay factor [0.5].
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
        swap_start: int = 10000,
        lambda_swap: float = 1.0,
        lambda_dis_align: float = 10.0,
        lambda_swap_align: float = 10.0,
        lr_decay_step: int | None = None,
        lr_gamma: float = 0.5,
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
        if swap_start < 0 or (lr_decay_step is not None and lr_decay_step < 1):
            raise ValueError(f"DisEnt needs swap_start >= 0 and lr_decay_step >= 1 or null, got "
                             f"{swap_start}, {lr_decay_step}")  # fmt: skip

    def build_net(self) -> nn.Module:
        h = self.hparams
        return DisEntNet(h.arch, h.num_classes, h.in_channels, h.image_size, h.pretrained)

    def bias_model_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.bias_logits(images)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        h = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: disent_lr_factor(step, h.swap_start, h.lr_decay_step, h.lr_gamma)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def swap_permutation(self, batch_size: int) -> torch.Tensor | None:
        """A random permutation of the batch once `global_step >= swap_start`, else None (no swapping)."""
        if self.global_step < self.hparams.swap_start:
            return None
        return torch.randperm(batch_size, device=self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        if self.fallback:
            return self.plain_step(batch)
        label = batch["label"]
        z_i, z_b = self.net.features(batch["image"])
        # W needs this step's CE of both heads first (as the reference, on the un-swapped features).
        with torch.no_grad():
            z = torch.cat((z_i, z_b), dim=1)
            ce_i = F.cross_entropy(self.net.head_i(z).float(), label, reduction="none")
            ce_b = F.cross_entropy(self.net.head_b(z).float(), label, reduction="none")
        weight = self.lff_step_weights(batch, ce_b, ce_i)
        perm = self.swap_permutation(label.numel())
        h = self.hparams
        t = disent_loss_terms(self.net, z_i, z_b, label, weight, self.bias_loss, perm, self.bias_mask(batch))
        loss_dis = t["dis_i"] + h.lambda_dis_align * t["dis_b"]
        loss_swap = t["swap_i"] + h.lambda_swap_align * t["swap_b"]
        loss = loss_dis + (h.lambda_swap * loss_swap if perm is not None else 0.0)
        terms = {"loss": loss, "loss_dis": loss_dis, "loss_swap": loss_swap}
        terms.update({f"loss_{k}": t[k] for k in ("dis_i", "dis_b", "swap_i", "swap_b")})
        self.log_train(terms, weight, batch)
        swap = float(perm is not None)
        self.log("train/swap_active", swap, on_step=False, on_epoch=True, batch_size=label.numel())
        return loss
