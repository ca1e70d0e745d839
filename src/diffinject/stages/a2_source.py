"""A² step 1 (issue 22): an unconditional style-based GAN trained label-free on the whole biased training set.

Shared across seeds, like the diffusion stage: only `batch["image"]` is read (labels and biases never),
mapped to model space by `to_model_space` (28-px digits padded with black to 32). One iteration = one
discriminator step (non-saturating logistic loss, lazy R1 on reals every `r1_every` iterations, weighted
`r1_gamma / 2 · r1_every` as StyleGAN2 does) then one generator step, under manual optimisation with two
Adam optimisers. Only the generator's optimiser step counts as a trainer step, so `trainer.max_steps` is
the number of iterations (the discriminator's optimiser is stepped directly; 32-bit or bf16 precision only,
since that step bypasses a 16-bit loss scaler). An EMA copy of the generator (decay warm-up as the diffusion
stage's) draws the TensorBoard sample grids and is what `on_fit_end` exports (`stages.gan_export`), with the
discriminator for the adaptation stage.

Scaled down from A²'s source GAN (rosinality StyleGAN2 at 32 px, batch 16/32, lr 0.002, r1 10 every 16,
800 k iterations, mapping 8 × 512 at 0.01 × lr): widths, mapping depth, iteration count; equalised LR,
noise inputs, path-length regularisation and style mixing are configured away (`nets.gan_style`).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from diffinject.diffusion.preprocess import from_model_space, to_model_space
from diffinject.nets.gan_style import StyleDiscriminator, StyleGenerator
from diffinject.stages.diffusion import ema_decay_at
from diffinject.stages.gan_export import save_gan_export
from diffinject.stages.gan_losses import (
    diff_augment,
    logistic_d_loss,
    nonsaturating_g_loss,
    parse_policy,
    r1_penalty,
)
from diffinject.stages.image_grid import log_image_grid

MANUAL_CHECKPOINT_HINT = "Using ModelCheckpoint with manual optimization and every_n_train_steps"


def check_gan_settings(
    lr: float,
    betas: tuple[float, float],
    r1_gamma: float,
    r1_every: int,
    ema_decay: float,
    every: int,
    n: int,
) -> None:
    """Refuse values training would accept but misuse (negative R1, a grid of zero images, …)."""
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1) (Adam's β1, β2), got {list(betas)}")
    if r1_gamma < 0 or r1_every < 1:
        raise ValueError(f"need r1_gamma >= 0 (0: no R1) and r1_every >= 1, got {r1_gamma}, {r1_every}")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    if every < 0 or (every > 0 and n < 1):
        raise ValueError(f"need sample_every_n_steps >= 0 and num_samples >= 1 for grids, got {every}, {n}")


class StyleGANStage(LightningModule):
    """What the A² source and adaptation stages share: the D/G iteration, EMA, grids, export.

    Subclasses build `generator`, `discriminator`, `generator_ema`, implement `configure_optimizers`
    (returning [G optimiser, D optimiser]) and may add to the G loss through `extra_generator_loss`.
    """

    #: the stage name recorded in gan_info.json
    stage_name = "a2_gan"

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_count: int | None = None
        self.generator: StyleGenerator
        self.generator_ema: StyleGenerator
        self.discriminator: StyleDiscriminator
        self.generator_args: dict[str, int] = {}
        self.discriminator_args: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        # The checkpoint after the iteration's steps is what resuming needs (step count, EMA and both
        # optimisers agree); Lightning's hint about pre-optimisation states does not apply.
        warnings.filterwarnings("ignore", message=MANUAL_CHECKPOINT_HINT, category=UserWarning)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr, mine in (("image_size", self.hparams.image_size), ("channels", self.hparams.channels)):
            theirs = getattr(datamodule, attr, None)
            if theirs is not None and int(theirs) != int(mine):
                raise ValueError(
                    f"{type(self).__name__} {attr}={mine} does not match the data module's {attr}={theirs}; "
                    "set model.init_args accordingly in the config"
                )
        precision = str(getattr(self.trainer, "precision", "32-true"))
        if "16" in precision and "bf16" not in precision:
            raise ValueError(
                f"{type(self).__name__} steps its discriminator outside Lightning's loss scaler: use 32-true "
                f"or bf16 precision, not {precision}"
            )

    def on_train_start(self) -> None:
        self._ema_count = None  # re-read after a checkpoint restore

    # ------------------------------------------------------------------------------------------- math
    def model_inputs(self, batch: Any) -> Tensor:
        """The batch's images in model space; nothing else of the batch is read (label-free)."""
        if not isinstance(batch, dict) or "image" not in batch:
            raise TypeError(f"{type(self).__name__} expects dict batches with an 'image' key")
        return to_model_space(batch["image"].float(), self.generator.model_size)

    def augment(self, x: Tensor) -> Tensor:
        """DiffAugment on everything D sees (real and fake), if a policy is set."""
        policy = self.hparams.diff_augment
        return diff_augment(x, policy) if policy else x

    def extra_generator_loss(self) -> dict[str, Tensor]:
        """Further generator loss terms (name → weighted value); the adaptation adds the consistency term."""
        return {}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        real = self.model_inputs(batch)
        opt_g, opt_d = self.optimizers()
        batch_size = real.shape[0]
        # discriminator: stepped on the raw optimiser so that only the G step counts as a trainer step
        regularise = hp.r1_gamma > 0 and self.global_step % hp.r1_every == 0
        with torch.no_grad():
            fake = self.generator(torch.randn(batch_size, self.generator.z_dim, device=real.device))
        real_in = real.detach().requires_grad_(regularise)
        real_logits = self.discriminator(self.augment(real_in))
        d_loss = logistic_d_loss(real_logits, self.discriminator(self.augment(fake)))
        d_total = d_loss
        if regularise:
            r1 = r1_penalty(real_in, real_logits)
            d_total = d_loss + hp.r1_gamma / 2 * r1 * hp.r1_every
            self.log("train/r1", r1.detach(), on_step=True, on_epoch=False)
        raw_d = opt_d.optimizer
        raw_d.zero_grad(set_to_none=True)
        self.manual_backward(d_total)
        raw_d.step()
        # generator: D frozen (its gradient is not needed), the fakes' gradient flows through D
        self.discriminator.requires_grad_(False)
        try:
            fake = self.generator(torch.randn(batch_size, self.generator.z_dim, device=real.device))
            g_loss = nonsaturating_g_loss(self.discriminator(self.augment(fake)))
            extras = self.extra_generator_loss()
            g_total = g_loss + sum(extras.values(), torch.zeros((), device=real.device))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_total)
            opt_g.step()
        finally:
            self.discriminator.requires_grad_(True)
        self._update_ema()
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/g_loss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        for name, value in extras.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=False)

    # -------------------------------------------------------------------------------------------- EMA
    def _update_ema(self) -> None:
        if self._ema_count is None:
            self._ema_count = int(self.ema_updates)
        self._ema_count += 1
        self.ema_updates.add_(1)
        decay = ema_decay_at(self._ema_count, self.hparams.ema_decay, self.hparams.ema_warmup)
        self.update_ema(decay)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema ← decay · ema + (1 − decay) · online (parameters; buffers copied)."""
        ema = list(self.generator_ema.parameters())
        online = [p.detach() for p in self.generator.parameters()]
        torch._foreach_lerp_(ema, online, 1.0 - decay)
        for ema_b, b in zip(self.generator_ema.buffers(), self.generator.buffers(), strict=True):
            ema_b.copy_(b)

    # ----------------------------------------------------------------------------------- grids, export
    @torch.no_grad()
    def sample(self, num_samples: int, seed: int, use_ema: bool = True) -> Tensor:
        """Images from fixed latents (CPU-seeded), [0, 1] at the data's size."""
        generator = self.generator_ema if use_ema else self.generator
        z = torch.randn(num_samples, generator.z_dim, generator=torch.Generator().manual_seed(seed))
        return from_model_space(generator(z.to(self.device)), self.hparams.image_size)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        every = int(self.hparams.sample_every_n_steps)
        if every == 0 or not self.trainer.is_global_zero:
            return
        step = self.global_step
        if step % every == 0 or step == self.trainer.max_steps:
            images = self.sample(self.hparams.num_samples, self.hparams.sample_seed)
            log_image_grid(self.trainer.loggers, f"samples/{self.stage_name}_ema", images, step)

    def export_info(self) -> dict[str, Any]:
        """What the later A² stages need to rebuild the networks (gan_info.json; the classes: the writer)."""
        hp = self.hparams
        return {
            "stage": self.stage_name,
            "image_size": int(hp.image_size),
            "channels": int(hp.channels),
            "model_size": int(self.generator.model_size),
            "generator_args": dict(self.generator_args),
            "discriminator_args": dict(self.discriminator_args),
            "weights": "ema",
            "ema_decay": float(hp.ema_decay),
            "global_step": int(self.global_step),
        }

    def export_path(self) -> Path:
        explicit = self.hparams.export_dir
        return Path(explicit) if explicit else Path(self.trainer.default_root_dir) / "generator"

    def on_fit_end(self) -> None:
        # Also runs when `--ckpt_path last` finds training finished, so a lost export is rewritten.
        if not self.trainer.is_global_zero:
            return
        path = save_gan_export(self.generator_ema, self.export_path(), self.export_info(), self.discriminator)
        rank_zero_info(f"Exported the EMA generator (step {self.global_step}) and discriminator to {path}")


class A2SourceGAN(StyleGANStage):
    """A²'s source generator: unconditional, label-free, on the whole biased training split.

    Args:
        image_size, channels: the data's (checked against the data module).
        model_size: the GAN's side (power of two; 28-px data is padded to 32).
        z_dim, w_dim, mapping_layers: latent sizes and mapping depth (StyleGAN2: 512, 512, 8).
        width, max_width: generator channels at full size and the cap (`nets.gan.feature_widths`).
        d_width, d_max_width: the discriminator's (None: the generator's).
        mbstd_group: minibatch-stddev group of D (0: off).
        lr, betas: Adam for both networks (StyleGAN2: 0.002, (0, 0.99)).
        mapping_lr_mult: the mapping network's lr factor (StyleGAN2's 0.01, without equalised LR).
        r1_gamma, r1_every: lazy R1 weight and interval (A²/rosinality: 10, 16).
        ema_decay, ema_warmup: generator EMA decay and its (1+s)/(10+s) warm-up.
        diff_augment: DiffAugment policy for D's inputs (None: off, as A²'s source GAN).
        sample_every_n_steps, num_samples, sample_seed: TensorBoard grids of the EMA generator (0: none).
        export_dir: the export folder (None: `{default_root_dir}/generator`).
    """

    stage_name = "a2_source"

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        model_size: int = 32,
        z_dim: int = 64,
        w_dim: int = 64,
        mapping_layers: int = 2,
        width: int = 8,
        max_width: int = 64,
        d_width: int | None = None,
        d_max_width: int | None = None,
        mbstd_group: int = 4,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.0, 0.99),
        mapping_lr_mult: float = 0.01,
        r1_gamma: float = 10.0,
        r1_every: int = 16,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        diff_augment: str | None = None,
        sample_every_n_steps: int = 250,
        num_samples: int = 16,
        sample_seed: int = 0,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_gan_settings(lr, betas, r1_gamma, r1_every, ema_decay, sample_every_n_steps, num_samples)
        if not mapping_lr_mult > 0:
            raise ValueError(f"mapping_lr_mult must be > 0, got {mapping_lr_mult}")
        if diff_augment:
            parse_policy(diff_augment)
        self.generator_args = {
            "model_size": model_size, "channels": channels, "z_dim": z_dim, "w_dim": w_dim,
            "mapping_layers": mapping_layers, "width": width, "max_width": max_width,
        }  # fmt: skip
        self.discriminator_args = {
            "model_size": model_size, "channels": channels, "width": d_width or width,
            "max_width": d_max_width or max_width, "mbstd_group": mbstd_group,
        }  # fmt: skip
        self.generator = StyleGenerator(**self.generator_args)
        self.discriminator = StyleDiscriminator(**self.discriminator_args)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        mapping = list(self.generator.mapping.parameters())
        ids = {id(p) for p in mapping}
        rest = [p for p in self.generator.parameters() if id(p) not in ids]
        opt_g = torch.optim.Adam(
            [{"params": rest}, {"params": mapping, "lr": hp.lr * hp.mapping_lr_mult}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        return [opt_g, opt_d]
