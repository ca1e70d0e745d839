"""Which epoch a classifier stage tests: the two rules on top of its validation score, label-free.

`SelectionRule` is mixed into `ClassifierModule` (which computes `val/acc_pseudo_balanced` and its standard
error every epoch):
- the minimum-group fallback: when the pseudo-conflicting validation group is too small to trust, the
  checkpoint callback loses its monitor, so `best.ckpt` is the last epoch (`metrics.selection_fallback`);
- the margin rule: after training, an earlier best epoch stays `best.ckpt` only when it beats the last epoch
  by more than `selection_margin_se` standard errors (`metrics.keep_last_epoch`); otherwise
  `promote_last_epoch` rewrites `best.ckpt` from `last.ckpt` with the decision recorded, atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from diffinject.measures.metrics import (
    PSEUDO_BALANCED,
    PSEUDO_BALANCED_SE,
    keep_last_epoch,
    selection_fallback,
)
from diffinject.stages.weights import CHECKPOINT_KEY


def promote_last_epoch(last_path: Path, best_path: str | Path, epoch: Any, selection: dict[str, Any]) -> bool:
    """Write `last_path` over `best_path` with `selection` merged into its record.

    False, and nothing written, when `last_path` is not the checkpoint of `epoch`."""
    checkpoint = torch.load(last_path, map_location="cpu", weights_only=False)
    record = checkpoint.setdefault(CHECKPOINT_KEY, {})
    if record.get("epoch") != epoch:
        return False
    record["selection"] = {**record.get("selection", {}), **selection}
    tmp = last_path.with_name(".best.ckpt.tmp")
    torch.save(checkpoint, tmp)
    shutil.move(tmp, best_path)
    return True


class SelectionRule:
    """The selection hooks of `ClassifierModule` (it provides `hparams`, `trainer`, `val_summary`, `selection`
    and `_best_checkpoint`, the stage's own `ModelCheckpoint` for `best.ckpt`)."""

    def _apply_selection_fallback(self, conflicting_size: float) -> None:
        """Keep the last epoch as `best.ckpt` when the pseudo-conflicting group is too small to trust.

        The group depends only on the bias model and the validation split, so the decision is the same at
        every epoch of a run; it is taken before the checkpoint callback saves (module hooks run first).
        """
        min_group = float(self.hparams.get("selection_min_group") or 0.0)
        fallback = selection_fallback(conflicting_size, min_group)
        rule = "last epoch" if fallback else PSEUDO_BALANCED
        self.selection = {"rule": rule, "pseudo_conflicting_size": conflicting_size, "min_group": min_group}
        best = self._best_checkpoint[0] if self._best_checkpoint else None
        if fallback and best is not None and best.monitor is not None:
            best.monitor = None  # a monitor-less ModelCheckpoint saves every epoch: best.ckpt = last epoch
            rank_zero_warn(
                f"{type(self).__name__}: only {conflicting_size:.1f} effective pseudo-conflicting validation "
                f"images (< selection_min_group={min_group:g}): {PSEUDO_BALANCED} would be noise, so "
                "best.ckpt is the last epoch"
            )

    def on_train_end(self) -> None:
        """The margin rule (`metrics.keep_last_epoch`): make `best.ckpt` the last epoch unless the best one
        beats it clearly. Runs after the checkpoint callbacks wrote both files for the final epoch."""
        best = self._best_checkpoint[0] if self._best_checkpoint else None
        if best is None or best.monitor != PSEUDO_BALANCED or best.best_model_score is None:
            return
        last_score = self.val_summary.get(PSEUDO_BALANCED)
        last_se = self.val_summary.get(PSEUDO_BALANCED_SE)
        if last_score is None or last_se is None or self.trainer.sanity_checking:
            return
        best_score, margin = float(best.best_model_score), float(self.hparams.get("selection_margin_se", 0.0))
        if margin <= 0:  # margin 0 turns the rule off: best.ckpt stays the plain maximum, ties included
            return
        last_path = Path(best.dirpath) / "last.ckpt"
        if not last_path.is_file() or not keep_last_epoch(best_score, float(last_score), last_se, margin):
            return
        if self.trainer.is_global_zero:
            selection = {
                "rule": "last epoch (best within margin)",
                "best_score": best_score,
                "last_score": float(last_score),
                "last_se": float(last_se),
                "margin_se": margin,
            }
            epoch = self.val_summary.get("epoch")
            if not promote_last_epoch(last_path, best.best_model_path, epoch, selection):
                rank_zero_warn(f"{last_path} is not the final epoch's; best.ckpt left as it is")
            else:
                rank_zero_info(
                    f"{type(self).__name__}: the best epoch ({PSEUDO_BALANCED} {best_score:.4f}) is within "
                    f"{margin:g} standard errors ({last_se:.4f}) of the last ({float(last_score):.4f}): "
                    "best.ckpt is the last epoch"
                )
        self.trainer.strategy.barrier("selection_margin")
