"""A small, independent re-implementation of guided-diffusion's ADM UNet math, with ADM's parameter names.

Written from the facts of `guided_diffusion/unet.py` / `nn.py` (openai/guided-diffusion, identical in
jychoi118/P2-weighting), not from `diffinject.convert`: the converter's tests save this model's state dict as
a checkpoint and compare the converted diffusers UNet against `ADMReference.forward_with_h`. It derives
attention levels and head counts itself (ADM's `ds in [image_size // r]` rule) so a slip in the converter's
own derivation shows up as a mismatch. Parameter names: `time_embed.{0,2}`, `input_blocks.N.M.…`,
`middle_block.{0,1,2}`, `output_blocks.N.M.…`, `out.{0,2}`; ResBlock `in_layers.{0,2}`, `emb_layers.1`,
`out_layers.{0,3}`, `skip_connection`; attention `norm`, `qkv`, `proj_out`; resampling convs `op` / `conv`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """32 groups, eps 1e-5, always computed in float32 and cast back (ADM's `GroupNorm32`)."""

    def __init__(self, channels: int) -> None:
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(t·f_i) | sin(t·f_i)], f_i = max_period^(−i/half), i < half = dim // 2 (odd dim: zero pad)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None].to(t.device)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN-SiLU-(resample)-conv, time embedding (added, or GN·(1+scale)+shift), GN-SiLU-dropout-conv, skip."""

    def __init__(
        self, ch: int, emb_ch: int, out_ch: int, scale_shift: bool, resample: str | None = None
    ) -> None:
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.in_layers = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_ch, out_ch * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_ch), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_ch == ch else nn.Conv2d(ch, out_ch, 1)

    def _resample(self, x: Tensor) -> Tensor:
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        if self.resample == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        norm, act, conv = self.in_layers
        h = conv(self._resample(act(norm(x))))
        x = self._resample(x)
        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, *rest = self.out_layers
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + e)
        for layer in rest:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over positions with a fused 1×1 conv1d qkv.

    Legacy order (`QKVAttentionLegacy`, the default): the 3C qkv channels are [head][q|k|v][d];
    new order (`QKVAttention`): [q|k|v][head][d]. q and k are each scaled by d^(−1/4) before the product.
    """

    def __init__(self, ch: int, heads: int, legacy: bool = True) -> None:
        super().__init__()
        self.heads, self.legacy = heads, legacy
        self.norm = GroupNorm32(ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = nn.Conv1d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        n, d = self.heads, c // self.heads
        if self.legacy:
            q, k, v = qkv.reshape(b, n, 3, d, -1).unbind(dim=2)
        else:
            q, k, v = qkv.reshape(b, 3, n, d, -1).unbind(dim=1)
        s = d**-0.25
        weights = torch.einsum("bndt,bnds->bnts", q * s, k * s).float().softmax(dim=-1).to(q.dtype)
        attended = torch.einsum("bnts,bnds->bndt", weights, v).reshape(b, c, -1)
        return (flat + self.proj_out(attended)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Step(nn.Sequential):
    """One ADM block: its layers in order, ResBlocks also given the time embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMReference(nn.Module):
    """ADM's `UNetModel` (unconditional, 2-D) from guided-diffusion's hyper-parameters (cfg attributes)."""

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        mc, mult, nrb = cfg.num_channels, tuple(cfg.channel_mult), cfg.num_res_blocks
        ss, updown, legacy = cfg.use_scale_shift_norm, cfg.resblock_updown, not cfg.use_new_attention_order
        attention_ds = [cfg.image_size // int(r) for r in cfg.attention_resolutions]
        emb_ch = 4 * mc
        self.model_channels = mc

        def heads(ch: int, up: bool) -> int:
            if cfg.num_head_channels != -1:
                return ch // cfg.num_head_channels
            return cfg.num_heads_upsample if up and cfg.num_heads_upsample != -1 else cfg.num_heads

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
        ch = mult[0] * mc
        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        skip_chs, ds = [ch], 1
        for level, m in enumerate(mult):
            for _ in range(nrb):
                layers: list[nn.Module] = [ResBlock(ch, emb_ch, m * mc, ss)]
                ch = m * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, False), legacy))
                self.input_blocks.append(Step(*layers))
                skip_chs.append(ch)
            if level != len(mult) - 1:
                down = ResBlock(ch, emb_ch, ch, ss, "down") if updown else Downsample(ch)
                self.input_blocks.append(Step(down))
                skip_chs.append(ch)
                ds *= 2
        self.middle_block = Step(
            ResBlock(ch, emb_ch, ch, ss),
            AttentionBlock(ch, heads(ch, False), legacy),
            ResBlock(ch, emb_ch, ch, ss),
        )
        self.output_blocks = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(nrb + 1):
                layers = [ResBlock(ch + skip_chs.pop(), emb_ch, m * mc, ss)]
                ch = m * mc
                if ds in attention_ds:
                    layers.append(AttentionBlock(ch, heads(ch, True), legacy))
                if level and i == nrb:
                    layers.append(ResBlock(ch, emb_ch, ch, ss, "up") if updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Step(*layers))
        out_ch = 2 * cfg.in_channels if cfg.learn_sigma else cfg.in_channels
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(ch, out_ch, 3, padding=1))

    def forward_with_h(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(output, h): h is the middle block's output, the h-space the injection edits."""
        emb = self.time_embed(timestep_embedding(t, self.model_channels))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = mid = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h), mid

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.forward_with_h(x, t)[0]


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (no zero-init output convs, no unit norms), variance-preserving scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith(".weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return model
