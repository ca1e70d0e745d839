"""Stage 2: P2-weighted ε-prediction DDPM on a diffusers `UNet2DModel`, with EMA, sample grids and export.

Loss (DESIGN.md "Math"): L = mean_b λ_{t_b} · mean_{CHW} (ε − ε_θ(x_t, t))², λ_t = 1/(k + SNR(t))^γ,
x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε, t ~ U{0, …, T−1}, linear β schedule. Unsupervised: only `batch["image"]`
is read, mapped to the model space by `to_model_space` (values to [-1, 1], 28 px padded with black to 32).

The EMA UNet is a frozen submodule, so it lives in every checkpoint and a resumed run continues it
exactly; it is what the sample grids use and what `on_fit_end` exports (`save_pretrained`, atomic) with a
`diffusion_info.json` describing preprocessing and schedule for the injection stage.

`init_from` (a folder or a cached hub id, see `nets/pretrained.py`) fine-tunes a pretrained UNet instead of
a fresh preset: both the UNet and its EMA start from the loaded weights, the architecture (and so
`model_size`) comes from its config, its schedule is checked against this module's, and the export records
the source. The EMA then runs at the full `ema_decay` from step 0 (no warm-up: the loaded weights are
already a good average, usually an EMA themselves, and a warm-up would swap them for the first noisy
fine-tuning steps). A learned-variance UNet (out_channels = 2·in_channels, e.g. a converted ADM model) is
trained on its ε channels only; its variance channels get no loss, so the exported variance head is stale
(DDIM ignores it).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from diffusers import UNet2DModel
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from diffinject.diffusion.ddim import ddim_generate
from diffinject.diffusion.preprocess import PREPROCESS_RULE, from_model_space, to_model_space
from diffinject.diffusion.schedule import ddim_timesteps, linear_alphas_cumprod, p2_weights
from diffinject.measures.sample_quality import ClippedEpsilon
from diffinject.nets.pretrained import check_architecture, check_schedule, load_pretrained
from diffinject.nets.unet import build_unet, get_preset, save_unet_export
from diffinject.stages.image_grid import log_image_grid


def ema_decay_at(step: int, max_decay: float, warmup: bool = True) -> float:
    """EMA decay after `step` optimiser steps: min(max_decay, (1+step)/(10+step)); max_decay if no warm-up.

    The warm-up keeps short runs from scratch useful: with a fixed 0.9999 a few thousand steps would leave
    the EMA almost at the random initialisation. A pretrained start skips it (module docstring).
    """
    return min(max_decay, (1.0 + step) / (10.0 + step)) if warmup else max_decay


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the base LR: linear warm-up, then constant or cosine decay to 0 at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def validate_training_settings(
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    warmup_steps: int,
    sample_every_n_epochs: int,
    num_samples: int,
    image_size: int,
    in_channels: int,
) -> None:
    """Refuse values the training would accept but misuse (e.g. 0 grid samples crash at the first grid)."""
    if not lr > 0.0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two values in [0, 1) (Adam's β1, β2), got {list(betas)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 (0: no LR warm-up), got {warmup_steps}")
    if sample_every_n_epochs < 0:
        raise ValueError(f"sample_every_n_epochs must be >= 0 (0: no grids), got {sample_every_n_epochs}")
    if num_samples < 0 or (sample_every_n_epochs > 0 and num_samples < 1):
        raise ValueError(
            f"num_samples must be >= 1 for the sample grids, got {num_samples}; set sample_every_n_epochs: 0 "
            "to turn the grids off"
        )
    if image_size < 1 or in_channels < 1:
        raise ValueError(f"image_size and in_channels must be >= 1, got {image_size}, {in_channels}")


class P2DiffusionModule(LightningModule):
    """DDPM training of one UNet preset with P2 weighting; see the module docstring for the contract.

    `image_size` is the data's image side (checked against the data module); `model_size` the UNet's
    (default: the preset's native size, e.g. 32 for CMNIST's 28 px digits). With `init_from` the UNet,
    `model_size` and the recorded preset come from the pretrained model (`unet_preset` is then unused).
    """

    def __init__(
        self,
        unet_preset: str = "cmnist-small",
        image_size: int = 32,
        in_channels: int = 3,
        model_size: int | None = None,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        p2_gamma: float = 1.0,
        p2_k: float = 1.0,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        ema_decay: float = 0.9999,
        sample_every_n_epochs: int = 10,
        num_samples: int = 16,
        sample_steps: int = 50,
        sample_seed: int = 0,
        sample_clip: bool = True,
        export_dir: str | None = None,
        channels_last: bool = False,
        compile: bool = False,
        fused_optimizer: bool = True,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        validate_training_settings(
            lr, weight_decay, betas, warmup_steps, sample_every_n_epochs, num_samples, image_size, in_channels
        )
        ddim_timesteps(num_train_timesteps, sample_steps)  # fail at construction on a bad sampling grid
        p2_weights(linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end), p2_gamma, p2_k)
        self.init_record: dict[str, Any] | None = None
        if init_from is None:
            self.unet_preset = unet_preset
            self.model_size = int(model_size or get_preset(unet_preset).sample_size)
            self.unet: UNet2DModel = build_unet(unet_preset, self.model_size, in_channels)
        else:
            self.unet = self._load_pretrained(init_from)
        self.ema_unet: UNet2DModel = copy.deepcopy(self.unet).requires_grad_(False)

        abar = linear_alphas_cumprod(num_train_timesteps, beta_start, beta_end)
        # float64 for sampling (ddim reads ᾱ as Python floats); float32 copies for the training step.
        self.register_buffer("alphas_cumprod", abar, persistent=False)
        self.register_buffer("sqrt_abar", abar.sqrt().float(), persistent=False)
        self.register_buffer("sqrt_one_minus_abar", (1.0 - abar).sqrt().float(), persistent=False)
        self.register_buffer("loss_weights", p2_weights(abar, p2_gamma, p2_k).float(), persistent=False)
        # Optimiser steps folded into the EMA so far (drives the decay warm-up); saved in checkpoints.
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self._ema_count: int | None = None
        self._compiled_unet: Any = None

    def _load_pretrained(self, init_from: str) -> UNet2DModel:
        """Load and check `init_from` (nets/pretrained.py) at construction, so errors come before training."""
        hp = self.hparams
        source = load_pretrained(init_from)
        self.model_size = check_architecture(source, hp.in_channels, hp.model_size, hp.image_size)
        checked = check_schedule(source, hp.num_train_timesteps, hp.beta_start, hp.beta_end)
        if not checked:
            rank_zero_warn(
                f"init_from={init_from!r}: no diffusion_info.json or scheduler config; assuming it was "
                f"trained with this module's schedule (linear β {hp.beta_start}..{hp.beta_end}, "
                f"T={hp.num_train_timesteps})"
            )
        info = source.info or {}
        self.unet_preset = str(info.get("unet_preset") or info.get("adm_preset") or "pretrained")
        self.init_record = {**source.record(), "schedule_checked_against": checked}
        shas = ", ".join(w["sha256"][:12] for w in source.weights)
        rank_zero_info(f"Fine-tuning the UNet from {source.unet_dir} (weights sha256 {shas}…)")
        return source.unet

    @property
    def learned_variance(self) -> bool:
        """Whether the UNet also outputs a variance (ADM's learned Σ): channels beyond in_channels."""
        return int(self.unet.config.out_channels) > int(self.hparams.in_channels)

    # ----------------------------------------------------------------------------------------- accessors
    @property
    def bottleneck(self) -> nn.Module:
        """The h-space: `unet.mid_block`, whose output (skips untouched) the injection stage reads/edits."""
        return self.unet.mid_block

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """ε_θ(x_t, t) of the trained (non-EMA) UNet, model space in and out (ε channels only)."""
        return self.unet(x, t).sample[:, : self.hparams.in_channels]

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for attr, mine in (("image_size", self.hparams.image_size), ("channels", self.hparams.in_channels)):
            theirs = getattr(datamodule, attr, None)
            if theirs is not None and int(theirs) != int(mine):
                raise ValueError(
                    f"P2DiffusionModule {'in_channels' if attr == 'channels' else attr}={mine} does not "
                    f"match the data module's {attr}={theirs}; set model.init_args accordingly in the config"
                )
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.unet.parameters() if p.requires_grad]
        device_type = params[0].device.type
        fused = bool(self.hparams.fused_optimizer) and device_type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(
            params,
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
            weight_decay=self.hparams.weight_decay,
            fused=fused or None,
        )
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        warmup, schedule = int(self.hparams.warmup_steps), self.hparams.lr_schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, warmup, total, schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip here rather than through the precision plugin.

        Lightning's AMP plugin refuses to clip for fused optimisers even under bf16, where there is no
        loss scaling to undo; with an fp16 GradScaler and a fused optimiser the grads are unscaled first.
        """
        if not gradient_clip_val:
            return
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimiser
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        if scaler is not None and getattr(raw, "_step_supports_amp_scaling", False):
            scaler.unscale_(raw)
        params = [p for group in raw.param_groups for p in group["params"] if p.grad is not None]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    # --------------------------------------------------------------------------------------- training
    def _eps_model(self) -> Any:
        if self.hparams.compile and self._compiled_unet is None:
            # Kept out of the module tree (object.__setattr__): checkpoints hold only `unet.*` keys, so a
            # compiled run resumes uncompiled and vice versa.
            object.__setattr__(self, "_compiled_unet", torch.compile(self.unet))
        return self._compiled_unet if self.hparams.compile else self.unet

    def model_inputs(self, batch: Any) -> Tensor:
        """The batch's images in model space ([-1, 1], model_size², channels_last if asked)."""
        if not isinstance(batch, dict) or "image" not in batch:
            raise TypeError(
                f"P2DiffusionModule expects dict batches with an 'image' key, got {type(batch).__name__}"
            )
        x0 = to_model_space(batch["image"].float(), self.model_size)
        if self.hparams.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0

    def p2_loss(self, x0: Tensor, t: Tensor, noise: Tensor, unet: nn.Module | None = None) -> Tensor:
        """P2-weighted ε-MSE for given timesteps and noise (fp32 reduction even under bf16 autocast).

        `unet` defaults to the trained UNet (compiled if asked); validation passes the EMA copy. Only the
        first in_channels outputs (ε) enter the loss: a learned-variance head is left as loaded.
        """
        shape = (-1, 1, 1, 1)
        x_t = self.sqrt_abar[t].view(shape) * x0 + self.sqrt_one_minus_abar[t].view(shape) * noise
        eps = (unet or self._eps_model())(x_t, t).sample[:, : x0.shape[1]].float()
        per_sample = (eps - noise.float()).pow(2).mean(dim=(1, 2, 3))
        return (self.loss_weights[t] * per_sample).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x0 = self.model_inputs(batch)
        t = torch.randint(0, self.hparams.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        loss = self.p2_loss(x0, t, noise)
        # Step values are rank 0's (no per-step collective); the epoch mean is reduced across ranks once.
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log(
            "train/loss_epoch", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=x0.shape[0]
        )
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """P2 loss of the EMA UNet with timesteps and noise fixed per batch, so epochs are comparable."""
        x0 = self.model_inputs(batch)
        generator = torch.Generator(device=x0.device).manual_seed(batch_idx)
        t = torch.randint(
            0, self.hparams.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator
        )
        noise = torch.randn(x0.shape, device=x0.device, generator=generator, dtype=x0.dtype)
        loss = self.p2_loss(x0, t, noise, unet=self.ema_unet)
        self.log("val/loss", loss, prog_bar=True, on_epoch=True, sync_dist=True, batch_size=x0.shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # EMA right after each optimiser step, before any callback (e.g. ModelCheckpoint) sees the step:
        # a checkpoint then always holds the EMA that matches its weights, so resuming is exact.
        super().optimizer_step(*args, **kwargs)
        if self._ema_count is None:  # read the (possibly restored) counter once: no device sync per step
            self._ema_count = int(self.ema_updates)
        self._ema_count += 1
        self.ema_updates.add_(1)
        warmup = self.hparams.init_from is None
        self.update_ema(ema_decay_at(self._ema_count, self.hparams.ema_decay, warmup))

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema ← decay · ema + (1 − decay) · online, for all parameters and buffers."""
        ema_params = list(self.ema_unet.parameters())
        online = [p.detach() for p in self.unet.parameters()]
        torch._foreach_lerp_(ema_params, online, 1.0 - decay)
        for ema_b, b in zip(self.ema_unet.buffers(), self.unet.buffers(), strict=True):
            ema_b.copy_(b)

    # ------------------------------------------------------------------------------- samples & export
    @torch.no_grad()
    def sample(self, num_samples: int, num_steps: int, seed: int, use_ema: bool = True) -> Tensor:
        """DDIM (η = 0) samples from Gaussian noise, fixed seed, fp32, autocast off; [0, 1] at image_size;
        x̂₀ clipped with `sample_clip`."""
        unet = self.ema_unet if use_ema else self.unet
        device = self.alphas_cumprod.device
        generator = torch.Generator(device=device).manual_seed(seed)
        shape = (num_samples, self.hparams.in_channels, self.model_size, self.model_size)
        x_T = torch.randn(shape, generator=generator, device=device)
        timesteps = ddim_timesteps(self.hparams.num_train_timesteps, num_steps)
        was_training = unet.training
        unet.eval()  # dropout off; the EMA copy is only ever run here
        # x̂₀ clipped to [−1, 1] as samplers from noise do (`sample_quality.ClippedEpsilon`); never in inject
        model = ClippedEpsilon(unet, self.alphas_cumprod) if self.hparams.get("sample_clip", True) else unet
        with torch.autocast(device_type=device.type, enabled=False):
            x = ddim_generate(model, x_T, self.alphas_cumprod, timesteps, generator=generator)
        unet.train(was_training)
        return from_model_space(x, self.hparams.image_size)

    def _grid_due(self) -> bool:
        every = int(self.hparams.sample_every_n_epochs)
        if every == 0:
            return False
        trainer = self.trainer
        last = (0 < trainer.max_steps <= trainer.global_step) or (
            trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        )
        return last or (trainer.current_epoch + 1) % every == 0

    def on_train_start(self) -> None:
        self._ema_count = None  # re-read after a checkpoint restore

    def on_train_epoch_end(self) -> None:
        # Rank 0 only, no collectives: the EMA UNet is called directly, outside the DDP wrapper.
        if not self.trainer.is_global_zero or not self._grid_due():
            return
        images = self.sample(self.hparams.num_samples, self.hparams.sample_steps, self.hparams.sample_seed)
        log_image_grid(self.trainer.loggers, "samples/ema_ddim", images, self.global_step)

    def export_info(self) -> dict[str, Any]:
        """What the injection stage needs to reuse the exported UNet exactly as it was trained."""
        hp = self.hparams
        info = {
            "format": "diffinject-diffusion-v1",
            "unet_preset": self.unet_preset,
            "image_size": int(hp.image_size),
            "model_size": self.model_size,
            "in_channels": int(hp.in_channels),
            "preprocess": PREPROCESS_RULE,
            "prediction_type": "epsilon",
            "beta_schedule": "linear",
            "num_train_timesteps": int(hp.num_train_timesteps),
            "beta_start": float(hp.beta_start),
            "beta_end": float(hp.beta_end),
            "p2_gamma": float(hp.p2_gamma),
            "p2_k": float(hp.p2_k),
            "ema_decay": float(hp.ema_decay),
            "weights": "ema",
            "global_step": int(self.global_step),
        }
        if self.init_record is not None:
            info["init_from"] = self.init_record
            info["ema_warmup"] = False
        if self.learned_variance:
            info["learned_variance"], info["out_channels"] = True, int(self.unet.config.out_channels)
            info["variance_head"] = "stale: only ε was trained (P2 loss); DDIM uses the first in_channels"
        return info

    def on_fit_end(self) -> None:
        # Also runs when `--ckpt_path last` finds training finished, so a lost export is rewritten.
        if self.hparams.export_dir is None or not self.trainer.is_global_zero:
            return
        path = save_unet_export(self.ema_unet, self.hparams.export_dir, self.export_info())
        rank_zero_info(f"Exported the EMA UNet (step {self.global_step}) to {path}")
