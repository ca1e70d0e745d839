"""Split `diffusers.UNet2DModel.forward` at the bottleneck: encoder + mid block, then decoder.

Why: the asymmetric injected DDIM step needs ε for both h and h̃ at the same x_t. Their encoders are
identical (skips come from x_t), so the encoder and mid block run once and only the decoder runs for both,
in one concatenated batch. `unet_decode(unet, unet_encode(unet, x, t))` equals `unet(x, t).sample`
exactly (same ops in the same order); configs whose forward differs (skip blocks, class conditioning,
unknown block types) are refused with a clear error instead of being silently mis-split.
Supported blocks: the presets' plain/attention blocks and, for converted ADM checkpoints
(`diffinject.convert`), the residual up/down-sampling ones (`ResnetDownsampleBlock2D`,
`ResnetUpsampleBlock2D`, attention blocks with `downsample_type`/`upsample_type="resnet"`); scale-shift
time conditioning lives inside the resnets and changes nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DModel
from diffusers.models.unets.unet_2d_blocks import (
    AttnDownBlock2D,
    AttnUpBlock2D,
    DownBlock2D,
    ResnetDownsampleBlock2D,
    ResnetUpsampleBlock2D,
    UNetMidBlock2D,
    UpBlock2D,
)
from torch import Tensor

SUPPORTED_DOWN_BLOCKS = (DownBlock2D, AttnDownBlock2D, ResnetDownsampleBlock2D)
SUPPORTED_UP_BLOCKS = (UpBlock2D, AttnUpBlock2D, ResnetUpsampleBlock2D)


@dataclass
class UNetEncoding:
    """What the decoder needs from the encoder: bottleneck h, skip activations, time embedding."""

    h: Tensor
    skips: tuple[Tensor, ...]
    emb: Tensor
    timesteps: Tensor

    def repeat(self, times: int) -> UNetEncoding:
        """The same encoding stacked `times` along the batch (for decoding several h at once)."""
        return UNetEncoding(
            h=torch.cat([self.h] * times),
            skips=tuple(torch.cat([s] * times) for s in self.skips),
            emb=torch.cat([self.emb] * times),
            timesteps=torch.cat([self.timesteps] * times),
        )


def check_split_supported(unet: torch.nn.Module) -> None:
    """Raise a ValueError naming the offending part if `unet` is not a UNet2DModel we can split exactly."""
    if not isinstance(unet, UNet2DModel):
        raise ValueError(f"unet_split supports diffusers UNet2DModel only, got {type(unet).__name__}")
    if not isinstance(unet.mid_block, UNetMidBlock2D):
        raise ValueError(
            f"unet_split needs a UNetMidBlock2D mid block (h-space), got {type(unet.mid_block).__name__}"
        )
    if unet.class_embedding is not None:
        raise ValueError(
            "unet_split does not support class-conditional UNets (class_embed_type / num_class_embeds)"
        )
    if unet.config.time_embedding_type not in ("positional", "fourier"):
        raise ValueError(f"unet_split: unsupported time_embedding_type {unet.config.time_embedding_type!r}")
    for kind, blocks, allowed in (
        ("down", unet.down_blocks, SUPPORTED_DOWN_BLOCKS),
        ("up", unet.up_blocks, SUPPORTED_UP_BLOCKS),
    ):
        for i, block in enumerate(blocks):
            # exact type: subclasses (and Skip*/KDown* blocks with a skip_conv path) change the forward
            if type(block) not in allowed or hasattr(block, "skip_conv"):
                names = ", ".join(cls.__name__ for cls in allowed)
                raise ValueError(
                    f"unet_split: {kind} block {i} is {type(block).__name__}; supported: {names}"
                )


def _timesteps(unet: UNet2DModel, timestep: Tensor | int, sample: Tensor) -> Tensor:
    # Same broadcasting as UNet2DModel.forward, so the embedding matches bit for bit.
    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], dtype=torch.long, device=sample.device)
    elif timestep.ndim == 0:
        timestep = timestep[None].to(sample.device)
    return timestep * torch.ones(sample.shape[0], dtype=timestep.dtype, device=timestep.device)


def unet_encode(unet: UNet2DModel, sample: Tensor, timestep: Tensor | int) -> UNetEncoding:
    """Run time embedding, conv_in, down blocks and the mid block; return h and what decoding needs."""
    check_split_supported(unet)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    timesteps = _timesteps(unet, timestep, sample)
    t_emb = unet.time_proj(timesteps).to(dtype=unet.dtype)
    emb = unet.time_embedding(t_emb)
    sample = unet.conv_in(sample)
    skips: tuple[Tensor, ...] = (sample,)
    for block in unet.down_blocks:
        sample, res_samples = block(hidden_states=sample, temb=emb)
        skips += res_samples
    h = unet.mid_block(sample, emb)
    return UNetEncoding(h=h, skips=skips, emb=emb, timesteps=timesteps)


def unet_decode(unet: UNet2DModel, encoding: UNetEncoding, h: Tensor | None = None) -> Tensor:
    """Run the up blocks and output head from `h` (default: the encoding's own h); returns the output."""
    sample = encoding.h if h is None else h
    if sample.shape[0] != encoding.emb.shape[0]:
        raise ValueError(
            f"unet_decode: h has batch {sample.shape[0]} but the encoding has {encoding.emb.shape[0]} "
            "(use encoding.repeat(n) to decode several h at once)"
        )
    skips = encoding.skips
    for block in unet.up_blocks:
        n = len(block.resnets)
        res_samples, skips = skips[-n:], skips[:-n]
        sample = block(sample, res_samples, encoding.emb)
    sample = unet.conv_norm_out(sample)
    sample = unet.conv_act(sample)
    sample = unet.conv_out(sample)
    if unet.config.time_embedding_type == "fourier":
        sample = sample / encoding.timesteps.reshape((sample.shape[0], *([1] * (sample.ndim - 1))))
    return sample
