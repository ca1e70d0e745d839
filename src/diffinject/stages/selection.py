"""Checkpoint files for the selection margin rule: kept apart from the module, which only decides.

`ClassifierModule.on_train_end` decides (`metrics.keep_last_epoch`) whether the last epoch replaces the best
one; this rewrites `best.ckpt` from `last.ckpt` with the decision recorded, atomically.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

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
