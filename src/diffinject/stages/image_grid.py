"""TensorBoard image grids (diffusion samples, synthetic images): rank-0, logger-agnostic helper."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchvision.utils import make_grid


def image_grid(images: Tensor, nrow: int | None = None) -> Tensor:
    """[B, C, H, W] images in [0, 1] → one C×H'×W' grid (about square when `nrow` is None), on the CPU."""
    if images.ndim != 4:
        raise ValueError(f"image_grid expects B×C×H×W images, got shape {tuple(images.shape)}")
    n = images.shape[0]
    if n == 0:  # make_grid would divide by zero
        raise ValueError(f"image_grid got no images (shape {tuple(images.shape)})")
    nrow = nrow or max(1, int(round(n**0.5)))
    return make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=2, pad_value=1.0)


def log_image_grid(
    loggers: Iterable[Any], tag: str, images: Tensor, step: int, nrow: int | None = None
) -> bool:
    """Add `images` as one grid to every TensorBoard logger in `loggers`; returns whether any took it.

    Call it on rank 0 only: it does no collective communication and other loggers are skipped silently,
    so a CSV-only run keeps working. An empty batch logs nothing (a warning says so) and returns False, so a
    caller that logs once tries again with the next batch.
    """
    if images.ndim == 4 and images.shape[0] == 0:
        rank_zero_warn(f"no images to log as {tag!r} at step {step} (an empty batch): skipped")
        return False
    grid: Tensor | None = None
    logged = False
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            grid = image_grid(images, nrow) if grid is None else grid
            logger.experiment.add_image(tag, grid, global_step=step, dataformats="CHW")
            logger.experiment.flush()
            logged = True
    return logged
