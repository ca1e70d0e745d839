"""AmpliBias (Ko et al., CIKM 2023), stage 1 of 2: a FastGAN-lite trained from scratch on one seed's top-K.

AmpliBias amplifies the bias-conflicting samples by training a generator *solely* on the top-K images the
bias stage extracted (no pretraining on the full data: that is its difference from A²). Its generator is
FastGAN (Liu et al., ICLR 2021); what is kept here (research note §2, "AmpliBias must include"):
- `nets.gan_fast.FastGenerator` (skip-layer excitation) and `FastDiscriminator` (self-supervised: decoders
  reconstruct each real image whole and one random quarter from D's own features);
- FastGAN's losses (`stages.gan_losses`): D = soft-label hinge on real and fake + the reconstruction loss
  (MSE or L1 instead of LPIPS: no pretrained VGG offline); G = −mean D(fake);
- DiffAugment 'color,translation' on real and fake alike (FastGAN's policy; never a flip: it mirrors digits);
- Adam 2e-4, β (0.5, 0.999), an EMA generator (FastGAN: 0.999).
Scaled to the CPU (config values): 32 px model space instead of 256-1024 px, narrow widths, hundreds of
iterations instead of 50k. `data` must be `TopKImagesDataModule`: nothing else reaches the GAN.

Manual optimisation, one iteration = a D step then a G step on the same augmented fakes (FastGAN's order).
The D step goes through the strategy without advancing Lightning's step counter (`_step_uncounted`), so
`trainer.max_steps` and `global_step` count iterations, not optimiser calls. The EMA warms up as the
diffusion stage's does (`ema_decay_at`): a fixed 0.999 over a few hundred steps would keep half the random
initialisation. Before sampling or export the EMA generator's BatchNorm statistics (and spectral-norm power
iterates) are re-estimated on its own outputs (`calibrate_generator`): copying the online generator's would
pair EMA weights with another network's activations. The export (`stages.gan_export`) is what
`AmpliBiasGenerate` reads.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from diffinject.diffusion.preprocess import from_model_space, to_model_space
from diffinject.nets.fingerprint import file_sha256
from diffinject.nets.gan_fast import FastDiscriminator, FastGenerator
from diffinject.stages.diffusion import ema_decay_at
from diffinject.stages.gan_export import save_gan_export
from diffinject.stages.gan_losses import (
    RECONSTRUCTION_KINDS,
    diff_augment,
    hinge_g_loss,
    parse_policy,
    reconstruction_loss,
    soft_hinge_d_fake,
    soft_hinge_d_real,
)
from diffinject.stages.image_grid import log_image_grid

#: the stage recorded in gan_info.json (and the config that writes the export)
STAGE = "amplibias_gan"


@torch.no_grad()
def calibrate_generator(generator: nn.Module, nz: int, batches: int, batch_size: int, seed: int) -> None:
    """Re-estimate the BatchNorm statistics (cumulative average) and spectral-norm iterates of `generator`.

    Runs `batches` forward passes in train mode on seeded noise: the first half refines the power iterates
    only, then the BN statistics are reset and averaged over the second half. Leaves the network in eval().
    """
    device = next(generator.parameters()).device
    noise = torch.Generator(device="cpu").manual_seed(seed)
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    generator.train()
    half = max(1, batches // 2)
    for step in range(half + max(1, batches - half)):
        if step == half:
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the remaining passes
        generator(torch.randn(batch_size, nz, generator=noise).to(device))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    generator.eval()


class AmpliBiasGAN(LightningModule):
    """FastGAN-lite on the top-K images (see the module docstring). Model space: C×S×S in [-1, 1].

    Args:
        image_size / channels: the data's (checked against the data module).
        model_size: the networks' side (a power of two ≥ 16; 28-px digits are padded to 32, not resampled).
        nz: noise size (FastGAN: 256). g_width / d_width: full-resolution channels of G / D (FastGAN's
            ngf = ndf = 64 at 256 px), doubled per halving up to max_width. sle_ratio: None = nets default.
        lr, betas: Adam for both networks (FastGAN: 2e-4, (0.5, 0.999)).
        ema_decay: the EMA generator's decay (with warm-up).
        policy / translation_ratio: DiffAugment on real and fake ('color,translation'; no flip exists).
        reconstruction / reconstruction_weight: the self-supervised D's pixel loss ('mse' | 'l1') and weight.
        rec_size: the decoders' output side (None: S/2, FastGAN's 128 at 256 px).
        sample_every_n_steps / num_samples / sample_seed: TensorBoard grids of the EMA generator (0: none).
        calibration_batches: forward passes that re-estimate the EMA generator's BN statistics.
        export_dir: where `on_fit_end` writes the EMA generator + gan_info.json (None: no export).
    """

    def __init__(
        self,
        image_size: int = 28,
        channels: int = 3,
        model_size: int = 32,
        nz: int = 64,
        g_width: int = 16,
        d_width: int = 16,
        max_width: int = 128,
        sle_ratio: int | None = None,
        spectral: bool = True,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.5, 0.999),
        ema_decay: float = 0.999,
        policy: str = "color,translation",
        translation_ratio: float = 0.125,
        reconstruction: str = "mse",
        reconstruction_weight: float = 1.0,
        rec_size: int | None = None,
        sample_every_n_steps: int = 200,
        num_samples: int = 16,
        sample_seed: int = 0,
        calibration_batches: int = 8,
        export_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        if not lr > 0 or len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"need lr > 0 and Adam betas in [0, 1), got lr={lr}, betas={list(betas)}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if reconstruction not in RECONSTRUCTION_KINDS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_KINDS}, got {reconstruction!r}")
        if reconstruction_weight < 0 or sample_every_n_steps < 0 or calibration_batches < 1:
            raise ValueError(
                "need reconstruction_weight >= 0, sample_every_n_steps >= 0 (0: no grids) and "
                f"calibration_batches >= 1, got {reconstruction_weight}, {sample_every_n_steps}, "
                f"{calibration_batches}"
            )
        if sample_every_n_steps > 0 and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 for the sample grids, got {num_samples}")
        parse_policy(policy)
        self.generator_args: dict[str, Any] = {
            "model_size": model_size, "channels": channels, "nz": nz, "width": g_width,
            "max_width": max_width, "sle_ratio": sle_ratio, "spectral": spectral,
        }  # fmt: skip
        self.generator = FastGenerator(**self.generator_args)
        self.discriminator = FastDiscriminator(model_size, channels, d_width, max_width, rec_size, spectral)
        self.ema_generator = copy.deepcopy(self.generator).requires_grad_(False)
        self.model_size = self.generator.model_size
        self.topk_record: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        pool = getattr(datamodule, "pool", None) if datamodule is not None else None
        if datamodule is None or not hasattr(datamodule, "topk_path"):
            raise TypeError(
                "AmpliBiasGAN trains on the top-K images only: data.class_path must be "
                f"diffinject.data.topk_images.TopKImagesDataModule, got {type(datamodule).__name__}"
            )
        hp = self.hparams
        for attr, mine in (("image_size", hp.image_size), ("channels", hp.channels)):
            if int(getattr(datamodule, attr)) != int(mine):
                raise ValueError(
                    f"AmpliBiasGAN {attr}={mine} does not match the data module's {attr}="
                    f"{getattr(datamodule, attr)}; set model.init_args.{attr} accordingly"
                )
        if pool is not None:
            self.topk_record = {
                "path": str(pool.path),
                "sha256": file_sha256(pool.path),
                "num_images": len(pool.indices),
                "per_class": pool.class_counts(int(datamodule.num_classes)),
                "k": datamodule.k,
                "k_source": datamodule.k_source,
            }

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = tuple(self.hparams.betas)
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=self.hparams.lr, betas=betas)
        opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=self.hparams.lr, betas=betas)
        return [opt_g, opt_d]

    # --------------------------------------------------------------------------------------- training
    def _augment(self, x: Tensor) -> Tensor:
        return diff_augment(x, self.hparams.policy, translation_ratio=self.hparams.translation_ratio)

    def _step_uncounted(self, optimizer: Any) -> None:
        """Step through the strategy (precision plugin included) without advancing `global_step`.

        In manual optimisation Lightning counts every `optimizer.step()`; with the D step counted too,
        `max_steps` would stop a run after half its iterations.
        """
        raw = getattr(optimizer, "optimizer", optimizer)
        self.trainer.strategy.optimizer_step(raw, closure=lambda: None, model=self)

    def discriminator_loss(self, real: Tensor, fake: Tensor, part: int) -> dict[str, Tensor]:
        """D's terms on augmented real and (detached) fake images: hinge real/fake and reconstruction."""
        logits_real, rec_whole, rec_part = self.discriminator.forward_with_reconstruction(real, part)
        rec = reconstruction_loss(rec_whole, rec_part, real, part, self.hparams.reconstruction)
        d_real = soft_hinge_d_real(logits_real)
        d_fake = soft_hinge_d_fake(self.discriminator(fake.detach()))
        total = d_real + d_fake + self.hparams.reconstruction_weight * rec
        return {"d_loss": total, "d_real": d_real, "d_fake": d_fake, "rec": rec}

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if not isinstance(batch, dict) or "image" not in batch:
            raise TypeError(
                f"AmpliBiasGAN expects dict batches with an 'image' key, got {type(batch).__name__}"
            )
        opt_g, opt_d = self.optimizers()
        real = to_model_space(batch["image"].float(), self.model_size)
        noise = torch.randn(real.shape[0], self.hparams.nz, device=real.device)
        fake = self._augment(self.generator(noise))
        real = self._augment(real)
        part = int(torch.randint(0, 4, (1,)))
        d_terms = self.discriminator_loss(real, fake, part)
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_terms["d_loss"])
        self._step_uncounted(opt_d)

        self.discriminator.requires_grad_(False)  # G's step needs D's input gradient only
        g_loss = hinge_g_loss(self.discriminator(fake))
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.discriminator.requires_grad_(True)
        self.update_ema(ema_decay_at(int(self.global_step), self.hparams.ema_decay))
        logs = {f"train/{name}": value.detach() for name, value in d_terms.items()}
        self.log_dict({**logs, "train/g_loss": g_loss.detach()}, prog_bar=False, on_step=True, on_epoch=False)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema ← decay · ema + (1 − decay) · online, parameters only (buffers: `calibrate_generator`)."""
        ema = list(self.ema_generator.parameters())
        online = [p.detach() for p in self.generator.parameters()]
        torch._foreach_lerp_(ema, online, 1.0 - decay)

    # ------------------------------------------------------------------------------- samples & export
    def calibrated_ema(self) -> FastGenerator:
        """The EMA generator in eval mode with BN statistics of its own (starting from the online buffers)."""
        with torch.no_grad():
            for ema_b, b in zip(self.ema_generator.buffers(), self.generator.buffers(), strict=True):
                ema_b.copy_(b)
        hp = self.hparams
        calibrate_generator(self.ema_generator, hp.nz, hp.calibration_batches, 64, hp.sample_seed + 1)
        return self.ema_generator

    @torch.no_grad()
    def sample(self, num_samples: int, seed: int) -> Tensor:
        """EMA samples from seeded noise, [0, 1] at the data's image_size (fp32, autocast off)."""
        generator = self.calibrated_ema()
        noise = torch.randn(num_samples, self.hparams.nz, generator=torch.Generator().manual_seed(seed))
        with torch.autocast(device_type=self.device.type, enabled=False):
            x = generator(noise.to(self.device))
        return from_model_space(x.float(), self.hparams.image_size)

    def on_train_start(self) -> None:
        """Log the whole top-K pool once: what the samples should look like."""
        pool = getattr(self.trainer.datamodule, "pool", None)
        if self.trainer.is_global_zero and pool is not None:
            log_image_grid(self.trainer.loggers, "amplibias/topk_real", pool.images, int(self.global_step))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.trainer.is_global_zero:
            return
        every = int(self.hparams.sample_every_n_steps)
        step = int(self.global_step)
        last = 0 < self.trainer.max_steps <= step
        if every > 0 and (step % every == 0 or last):
            images = self.sample(self.hparams.num_samples, self.hparams.sample_seed)
            log_image_grid(self.trainer.loggers, "amplibias/samples_ema", images, step)

    def export_info(self) -> dict[str, Any]:
        """What `AmpliBiasGenerate` needs to rebuild the generator and check it fits the data and top-K.

        The writer adds `format`, `preprocess` and `generator_class` (`stages.gan_export`).
        """
        hp = self.hparams
        return {
            "stage": STAGE,
            "generator_args": dict(self.generator_args),
            "model_size": self.model_size,
            "channels": int(hp.channels),
            "image_size": int(hp.image_size),
            "weights": "ema",
            "ema_decay": float(hp.ema_decay),
            "batchnorm": f"recalibrated on {hp.calibration_batches} batches of the EMA generator's samples",
            "global_step": int(self.global_step),
            "losses": {"d": "soft hinge", "g": "hinge", "reconstruction": hp.reconstruction},
            "policy": hp.policy,
            "topk": self.topk_record,
        }

    def on_fit_end(self) -> None:
        # Also runs when `--ckpt_path last` finds training finished, so a lost export is rewritten.
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        path = save_gan_export(self.calibrated_ema(), self.hparams.export_dir, self.export_info())
        rank_zero_info(f"Exported the EMA generator (step {self.global_step}) to {path}")
