"""Generator quality during diffusion training: unconditional samples measured every N optimiser steps.

`SampleQualityMonitor` samples the EMA UNet of a `P2DiffusionModule` (deterministic DDIM from the same
seeded noise each time, so the curve follows the model, not the noise) and logs, through every logger:
`quality/recognised`, `quality/palette_close`, `quality/frechet` (see `measures.sample_quality`), and
once, the held-out real images' own values `quality/frechet_floor`, `quality/real_recognised`,
`quality/real_palette_close`. At fit end the figures of every evaluation go to `sample_quality.json` in
the trainer's `log_dir` (or `default_root_dir` without a logger).

It is a measurement for the user, never a selection rule. The shape probe and palette only make sense for
RGB Colored MNIST: with another data module it warns once and does nothing. Rank zero only, no
collectives. The fit-end evaluation runs only when at least `every_n_steps` steps were trained and the
last step was not just measured, so short smoke runs pay nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from diffinject.measures.sample_quality import (
    RECOGNISED_THRESHOLD,
    QualityReference,
    build_reference,
    dataset_arrays,
    sample_unconditional,
)

RESULT_FILENAME = "sample_quality.json"
LOGGED = ("recognised", "palette_close", "frechet")
LOGGED_ONCE = ("frechet_floor", "real_recognised", "real_palette_close")


class SampleQualityMonitor(Callback):
    """Log generator-quality figures of the EMA UNet every `every_n_steps` optimiser steps and at fit end.

    `num_samples` samples with `steps` DDIM steps (η = 0, noise seed `seed`); as many real training images
    are held out of the probe's training to give the floor (`max_real_images` caps the real set read).
    `clip` (default) clips x̂₀ to [−1, 1] on every step, as DDIM samplers from noise do (diffusers'
    `clip_sample`): an unclipped 3,200-step CPU model drifts into saturated colour fields and blank frames
    that no data image looks like. The inject stage never clips (its inversion must stay exact).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_samples: int = 256,
        steps: int = 50,
        seed: int = 0,
        batch_size: int = 64,
        threshold: float = RECOGNISED_THRESHOLD,
        max_distance: float | None = None,
        probe_iterations: int = 150,
        max_real_images: int = 20000,
        clip: bool = True,
    ) -> None:
        super().__init__()
        self.clip = clip
        if every_n_steps < 1 or num_samples < 2 or steps < 1:
            raise ValueError(
                f"SampleQualityMonitor needs every_n_steps >= 1, num_samples >= 2, steps >= 1; got "
                f"{every_n_steps}, {num_samples}, {steps}"
            )
        self.every_n_steps, self.num_samples, self.steps = every_n_steps, num_samples, steps
        self.seed, self.batch_size = seed, batch_size
        self.threshold, self.max_distance = threshold, max_distance
        self.probe_iterations, self.max_real_images = probe_iterations, max_real_images
        self.reference: QualityReference | None = None
        self.history: list[dict[str, Any]] = []
        self._disabled = False
        self._last_step: int | None = None

    # ------------------------------------------------------------------------------------------- checks
    def _usable(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        if self._disabled:
            return False
        from diffinject.data import CMNISTDataModule  # late: keeps callbacks importable without data

        reason = None
        if not isinstance(getattr(trainer, "datamodule", None), CMNISTDataModule):
            reason = "the data module is not a CMNISTDataModule (shape probe and palette are CMNIST's)"
        elif not hasattr(pl_module, "alphas_cumprod") or not hasattr(pl_module, "ema_unet"):
            reason = f"{type(pl_module).__name__} has no ema_unet/alphas_cumprod (not a P2DiffusionModule)"
        if reason is not None:
            rank_zero_warn(f"SampleQualityMonitor does nothing: {reason}")
            self._disabled = True
        return not self._disabled

    # -------------------------------------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = trainer.global_step
        if step >= self.every_n_steps and step != self._last_step:
            self.evaluate(trainer, pl_module)
        if self.history and trainer.is_global_zero:
            folder = Path(trainer.log_dir or trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            result = {**self.history[-1], "history": self.history}
            (folder / RESULT_FILENAME).write_text(json.dumps(result, indent=2) + "\n")

    # ---------------------------------------------------------------------------------------- measuring
    def _build_reference(self, trainer: Trainer) -> QualityReference:
        data = trainer.datamodule
        if getattr(data, "train_eval_dataset", None) is None:
            data.setup("fit")
        dataset = getattr(data, "train_eval_dataset", None) or data.train_dataset
        images, labels = dataset_arrays(dataset, self.max_real_images, self.seed)
        return build_reference(
            images,
            labels,
            int(data.num_classes),
            self.num_samples,
            seed=self.seed,
            probe_iterations=self.probe_iterations,
            threshold=self.threshold,
            max_distance=self.max_distance,
        )

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """Sample, measure and log at the current step (rank zero); returns the figures, or None."""
        step = trainer.global_step
        self._last_step = step
        if not trainer.is_global_zero or not self._usable(trainer, pl_module):
            return None
        start = time.perf_counter()
        first = self.reference is None
        if self.reference is None:
            self.reference = self._build_reference(trainer)
        samples = sample_unconditional(
            pl_module.ema_unet,
            pl_module.alphas_cumprod,
            self.num_samples,
            self.steps,
            self.seed,
            clip=self.clip,
            image_size=int(pl_module.hparams.get("image_size", 0)) or None,
            batch_size=self.batch_size,
        )
        figures = {"step": step, **self.reference.evaluate(samples)}
        figures["seconds"] = round(time.perf_counter() - start, 2)
        self.history.append(figures)
        keys = LOGGED + LOGGED_ONCE if first else LOGGED
        metrics = {f"quality/{k}": float(figures[k]) for k in keys if math.isfinite(figures[k])}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        return figures
