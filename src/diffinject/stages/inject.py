"""Stage 3: DDIM inversion + h-space slerp content injection → the synthetic bias-conflicting images.

Per batch of (content, style) pairs from `InjectionPairsDataModule`: invert the styles (η = 0, fp32),
invert any content image not seen yet *once* (recording its h at every grid point, kept in fp32 in a
bounded, preallocated `ContentCache` and reused for every later pair), then regenerate each style from its
x_T with the content's h slerp-blended into the bottleneck on steps t ≥ t_edit (Asyrp asymmetric step,
encoder once and the decoder for h and h̃ in one batch) and η = 1 on steps t ≤ t_boost with per-sample
noise. Every UNet pass runs at one fixed batch shape (`micro_batch`), so a sample's pixels do not depend on
the batch it arrived in. The images come back at the dataset's size for `SyntheticImageWriter`. Math:
DESIGN.md "Math"; functions in `diffinject.diffusion`; settings checks in `inject_settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from diffinject.diffusion import (
    PREPROCESS_RULE,
    Guidance,
    Injection,
    box_mask,
    check_split_supported,
    ddim_generate,
    ddim_invert,
    ddim_timesteps,
    from_model_space,
    linear_alphas_cumprod,
    to_model_space,
)
from diffinject.diffusion.steering import classifier_guidance_fn, match_channel_stats
from diffinject.nets.fingerprint import weights_fingerprint
from diffinject.nets.unet import INFO_FILENAME, load_unet_export, read_export_info
from diffinject.stages.content_cache import ContentCache
from diffinject.stages.inject_settings import (
    diffusion_stage_hint,
    validate_batching,
    validate_injection_settings,
    validate_modes,
    validate_windows,
)
from diffinject.stages.weights import load_classifier_checkpoint

#: the batch entries `inject` reads (the writer reads the others)
INJECT_KEYS = ("style_image", "content_image", "content_index", "noise_seed")


class InjectionPredictModule(LightningModule):
    """Predict-only module: (content, style) pairs in, synthetic images (uint8, dataset size) out.

    Args:
        unet: folder of the diffusion stage's export (`save_pretrained` + diffusion_info.json).
        steps: DDIM steps S for inversion and generation (must divide T).
        gamma: slerp weight γ (0: style unchanged, 1: full content h).
        t_edit: inject on generation steps with t ≥ t_edit.
        t_boost: stochastic (η = 1) steps for t ≤ t_boost.
        inject_every: inject only on every k-th generation step (from the noisiest) with t ≥ t_edit; the
            plain steps between pull x back towards the data (the reference injects on ~30 of 1,000 steps).
        mask_box: local mode, (top, left, bottom, right) of the h map in relative coordinates; None = global.
        autocast: run the UNet in bf16 autocast during generation (CUDA only; state stays fp32).
        autocast_inversion: also during the inversions (DESIGN.md asks fp32 inversion; off by default).
        shared_encoder: encoder + mid once and the decoder for h and h̃ in one batch (False: two full UNet
            passes with an h-space hook, the reference scheme; same result, slower).
        cache_content: invert each content image once and reuse its h (False: re-invert per pair, reference).
        content_cache_mb: memory bound of that cache in MiB (h trajectories + x_T, on the module's device);
            contents beyond it are re-inverted whenever needed (same images, slower; a note is logged).
            None: unbounded.
        micro_batch: every UNet pass (inversions, generation, guidance) runs on exactly this many samples,
            the last chunk padded, so a sample's pixels do not depend on which samples share its batch
            (resume, device count, last batch). None: the data module's batch_size (or, without one, each
            batch's own size). Changing it changes pixels by rounding (measured ≤ 1/255).
        channels_last: channels-last memory format for the UNet (faster convolutions on recent GPUs).
        blend: h-space operation, "slerp" (the paper: the whole map) or "adain" (per-channel statistics only).
        t_start: upper end of an injection window t_edit ≤ t ≤ t_start (None: every step from t_edit up).
        start_from: "style" (the paper), "content" or "content_stats" (the content's x_T with the style's
            per-channel mean/std) — see `START_FROM`.
        inject_from: whose h is blended in, "content" (the paper) or "style"; with start_from "content" this
            swaps the roles of the two images.
        bias_model: the seed's bias-stage checkpoint (`bias/checkpoints/best.ckpt`); needed by guidance.
        guidance_scale: bias-model guidance on x̂₀ (0: off): steer x̂₀ towards the class the bias model assigns
            the style image, by this step size (model-space units, normalised gradient) per guided step.
        guidance_t_min, guidance_t_max: the guided steps, t_min ≤ t ≤ t_max (None: up to T).
        guidance_smooth: box-blur radius r of the guidance gradient ((2r+1)² pixels; 0: the raw gradient).
        guidance_structure: weight of a pull towards the content's local structure (SSIM's structure term,
            `steering.structure_similarity`) beside the bias-model push (0: off).
        guidance_fade: scale the push by (1 − p) so it stops once the bias model reads the style's class.
    """

    def __init__(
        self,
        unet: str,
        steps: int = 50,
        gamma: float = 0.7,
        t_edit: int = 400,
        t_boost: int = 200,
        inject_every: int = 1,
        mask_box: tuple[float, float, float, float] | None = None,
        autocast: bool = False,
        autocast_inversion: bool = False,
        shared_encoder: bool = True,
        cache_content: bool = True,
        content_cache_mb: float | None = 2048.0,
        micro_batch: int | None = None,
        channels_last: bool = False,
        blend: str = "slerp",
        t_start: int | None = None,
        start_from: str = "style",
        inject_from: str = "content",
        bias_model: str | None = None,
        guidance_scale: float = 0.0,
        guidance_t_min: int = 0,
        guidance_t_max: int | None = None,
        guidance_smooth: int = 0,
        guidance_structure: float = 0.0,
        guidance_fade: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        validate_modes(
            blend, t_start, t_edit, start_from, inject_from, bias_model, guidance_scale, guidance_smooth
        )
        unet_dir = Path(unet)
        if not (unet_dir / "config.json").is_file() or not (unet_dir / INFO_FILENAME).is_file():
            raise FileNotFoundError(
                f"UNet export {unet_dir} not found (expected config.json and {INFO_FILENAME}): the diffusion "
                f"stage writes it, run `{diffusion_stage_hint(unet_dir)}` first"
            )
        self.info: dict[str, Any] = read_export_info(unet_dir / INFO_FILENAME)
        num_train_timesteps = int(self.info.get("num_train_timesteps", 1000))
        validate_injection_settings(num_train_timesteps, steps, gamma, t_edit, t_boost)
        validate_batching(micro_batch, content_cache_mb)
        if inject_every < 1:
            raise ValueError(
                f"inject_every must be >= 1 (1: every step with t >= t_edit), got {inject_every}"
            )
        self.timesteps = ddim_timesteps(num_train_timesteps, steps)
        validate_windows(
            [int(t) for t in self.timesteps], gamma, t_edit, t_start, inject_every,
            guidance_scale, guidance_t_min, guidance_t_max,
        )  # fmt: skip
        if self.info.get("preprocess", PREPROCESS_RULE) != PREPROCESS_RULE:
            raise ValueError(
                f"{unet_dir / INFO_FILENAME}: preprocess {self.info.get('preprocess')!r} is not the rule "
                f"this code implements ({PREPROCESS_RULE!r})"
            )
        if self.info.get("prediction_type", "epsilon") != "epsilon":
            raise ValueError(
                f"{unet_dir}: only ε-prediction UNets are supported, got {self.info['prediction_type']!r}"
            )
        model, _ = load_unet_export(unet_dir)
        self.unet = model.eval().requires_grad_(False)
        #: sha256 of the weights: the writer refuses to resume a folder made from other weights
        self.unet_sha256 = weights_fingerprint(unet_dir)
        if shared_encoder:
            check_split_supported(self.unet)
        if mask_box is not None:
            box_mask(8, 8, mask_box)  # validate now, build at the h map's real size later
        abar = linear_alphas_cumprod(
            num_train_timesteps,
            float(self.info.get("beta_start", 1e-4)),
            float(self.info.get("beta_end", 0.02)),
        )
        self.register_buffer("alphas_cumprod", abar, persistent=False)  # float64: ddim reads Python floats
        self.model_size = int(self.unet.config.sample_size)
        self.content_cache = ContentCache(content_cache_mb)
        self.bias_net: torch.nn.Module | None = None
        if bias_model is not None:
            net, _ = load_classifier_checkpoint(bias_model, expect={})
            self.bias_net = net.eval().requires_grad_(False)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        channels = getattr(datamodule, "channels", None)
        if channels is not None and int(channels) != int(self.unet.config.in_channels):
            raise ValueError(
                f"the UNet in {self.hparams.unet} takes {self.unet.config.in_channels} channels but the data "
                f"module's images have {channels}"
            )
        trained_size = self.info.get("image_size")
        data_size = getattr(datamodule, "image_size", None)
        if trained_size is not None and data_size is not None and int(trained_size) != int(data_size):
            rank_zero_warn(
                f"the UNet in {self.hparams.unet} was trained on {trained_size} px images but the data "
                f"module serves {data_size} px (resampled to the UNet's {self.model_size} px and back)"
            )
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        plan = getattr(datamodule, "plan", None)
        if plan is not None and hasattr(plan, "content"):
            self.content_cache.reserve(len({int(c) for c in plan.content}))

    @property
    def chunk_size(self) -> int | None:
        """Samples per UNet pass: `micro_batch`, else the data module's batch_size (None: the batch's)."""
        if self.hparams.micro_batch is not None:
            return int(self.hparams.micro_batch)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(datamodule, "batch_size", None)
        return int(size) if size is not None else None

    # ---------------------------------------------------------------------------------------------- math
    def _autocast(self, enabled: bool) -> torch.autocast:
        # Always an explicit context: a trainer-level bf16 autocast must not leak into the fp32 parts.
        on = enabled and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=on)

    def _invert(self, x0: Tensor, record_h: bool) -> Any:
        with self._autocast(self.hparams.autocast_inversion):
            return ddim_invert(
                self.unet, x0, self.alphas_cumprod, self.timesteps, record_h=record_h,
                shared_encoder=self.hparams.shared_encoder,
            )  # fmt: skip

    def content_h(
        self, content_ids: list[int], content_images: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(h, slots, x_T): an h pool [P, S, C, h, w], each sample's slot in it, and each sample's inverted
        x_T [B, C, H, W] (kept beside its h, for generations that start from the content).

        Each content image is inverted once, the first time a batch needs it, and kept (fp32, module device)
        in the bounded `content_cache` for every later pair; new contents are inverted at the batch's shape
        (padded), so a cached, a recomputed and a `cache_content=False` h are the same numbers. With
        `cache_content=False` every pair's content is re-inverted (the reference scheme; slots None).
        """
        if not self.hparams.cache_content:
            inversion = self._invert(to_model_space(content_images, self.model_size), record_h=True)
            assert inversion.h is not None
            return inversion.h, None, inversion.latent
        cache = self.content_cache
        first_position: dict[int, int] = {}
        for position, cid in enumerate(content_ids):
            if cid not in cache.slot and cid not in first_position:
                first_position[cid] = position
        fresh: dict[int, tuple[Tensor, Tensor]] = {}
        if first_position:
            new_ids = list(first_position)
            rows = [first_position[c] for c in new_ids]
            rows += [rows[0]] * (len(content_ids) - len(rows))  # pad to the batch's shape
            inversion = self._invert(to_model_space(content_images[rows], self.model_size), record_h=True)
            assert inversion.h is not None
            h, latent = inversion.h[: len(new_ids)], inversion.latent[: len(new_ids)]
            stored = set(cache.add(new_ids, h, latent))
            fresh = {c: (h[j], latent[j]) for j, c in enumerate(new_ids) if c not in stored}
        return cache.gather(content_ids, fresh)

    def _guidance(self, style_images: Tensor, content_images: Tensor) -> Guidance | None:
        """Bias-model guidance towards the class the bias model assigns each style image (label-free)."""
        hp = self.hparams
        if hp.guidance_scale == 0.0:
            return None
        assert self.bias_net is not None
        self.bias_net.to(self.device)
        with torch.no_grad():
            target = self.bias_net(style_images).argmax(dim=1)
        grad_fn = classifier_guidance_fn(
            self.bias_net, target, style_images.shape[-1], fade=hp.guidance_fade, smooth=hp.guidance_smooth,
            reference=to_model_space(content_images, self.model_size), structure_weight=hp.guidance_structure,
        )  # fmt: skip
        return Guidance(grad_fn, hp.guidance_scale, hp.guidance_t_min, hp.guidance_t_max)

    def _noise_fn(self, seeds: list[int], shape: tuple[int, ...]) -> Any:
        """Per-sample CPU generators: sample b's noise depends on its own seed only, never on the batch."""
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        def noise(step_index: int) -> Tensor:
            return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

        return noise

    def inject(self, batch: dict[str, Any]) -> Tensor:
        """Synthetic images of a batch, in [0, 1] at the dataset's size (B×C×H×W, float32).

        Runs in chunks of exactly `micro_batch` samples (the last one padded with copies of its first row):
        kernels pick their algorithm by batch shape, so a fixed shape keeps every sample's pixels
        independent of the batch it arrived in (tests/test_inject_reliability.py).
        """
        n = len(batch["content_index"])
        chunk = self.chunk_size or n
        outputs = []
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            padded = rows + [start] * (chunk - len(rows))
            part = {k: batch[k][padded] for k in INJECT_KEYS}
            outputs.append(self._inject_chunk(part)[: len(rows)])
        return torch.cat(outputs)

    def _inject_chunk(self, batch: dict[str, Any]) -> Tensor:
        hp = self.hparams
        style_images, content_images = batch["style_image"].float(), batch["content_image"].float()
        orig_size = style_images.shape[-1]
        content_ids = [int(c) for c in batch["content_index"]]
        with torch.autocast(device_type=self.device.type, enabled=False):
            h_content, slots, content_latent = self.content_h(content_ids, content_images)
            style = None  # the style's inversion, only where its x_T or h is used
            if hp.start_from != "content" or (hp.inject_from == "style" and hp.gamma > 0.0):
                style = self._invert(
                    to_model_space(style_images, self.model_size), record_h=hp.inject_from == "style"
                )
            if hp.start_from == "style":
                assert style is not None
                latent = style.latent
            else:
                latent = content_latent.to(self.device)
                if hp.start_from == "content_stats":
                    assert style is not None
                    latent = match_channel_stats(latent, style.latent)
            if hp.inject_from == "style" and hp.gamma > 0.0:
                assert style is not None and style.h is not None
                h_content, slots = style.h, None
            mask = None
            if hp.mask_box is not None:
                mask = box_mask(h_content.shape[-2], h_content.shape[-1], hp.mask_box).to(self.device)
            injection = None
            if hp.gamma > 0.0:
                injection = Injection(
                    h_content, gamma=hp.gamma, t_edit=hp.t_edit, mask=mask, slots=slots,
                    every=hp.inject_every, t_start=hp.t_start, blend=hp.blend,
                )  # fmt: skip
            noise = self._noise_fn([int(s) for s in batch["noise_seed"]], tuple(latent.shape[1:]))
            with self._autocast(hp.autocast):
                x = ddim_generate(
                    self.unet, latent, self.alphas_cumprod, self.timesteps, t_boost=hp.t_boost, noise=noise,
                    injection=injection, guidance=self._guidance(style_images, content_images),
                    shared_encoder=hp.shared_encoder,
                )  # fmt: skip
        return from_model_space(x.float(), orig_size)

    # -------------------------------------------------------------------------------------------- hooks
    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        images = self.inject(batch)
        return {
            "index": batch["index"].cpu(),
            "images": (images * 255.0).round().to(torch.uint8).cpu(),
        }

    def forward(self, batch: dict[str, Any]) -> Tensor:
        return self.inject(batch)

    def on_predict_start(self) -> None:
        self.unet.eval()
        self.content_cache.to(self.device)

    def clear_content_cache(self) -> None:
        self.content_cache.clear()
