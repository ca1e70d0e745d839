"""OpenAI guided-diffusion ("ADM") UNets, as released by P2 weighting and ILVR, → diffusers `UNet2DModel`.

Pure functions: `diffusers_config(cfg)` builds the equivalent `UNet2DModel` configuration and
`convert_state_dict(adm_state, cfg, unet)` maps an ADM state dict onto it, consuming every ADM key and
filling every diffusers parameter, or raising `ADMConversionError` listing missing / unexpected keys and
shape mismatches. Facts this relies on (guided-diffusion `guided_diffusion/unet.py` and `nn.py`, identical
in jychoi118/P2-weighting):

- `timestep_embedding` is [cos | sin] with frequencies exp(−ln(10⁴)·i/half): diffusers
  `Timesteps(flip_sin_to_cos=True, freq_shift=0)`. Its width is `model_channels`, diffusers' is
  `block_out_channels[0]`, hence `channel_mult[0] == 1` is required.
- `normalization` = `GroupNorm32(32, ch)` (eps 1e-5, computed in float32): `norm_num_groups=32`,
  `norm_eps=1e-5`. `UNet2DModel` builds the mid-block attention *without* GroupNorm unless
  `resnet_time_scale_shift == "default"`, so `attn_norm_num_groups=32` is set explicitly.
- `ResBlock`: in_layers = (norm, SiLU, conv), emb_layers = (SiLU, linear), out_layers = (norm, SiLU,
  dropout, conv); scale-shift norm does norm(h)·(1 + scale) + shift with (scale, shift) = chunk(emb, 2);
  `up`/`down` resample both paths between in_layers' SiLU and conv (nearest ×2 / 2×2 average pooling):
  exactly `ResnetBlock2D(time_embedding_norm="scale_shift", up=/down=)`.
- `AttentionBlock` with `QKVAttentionLegacy` (the default, `use_new_attention_order=False`): the 1×1 conv1d
  `qkv` rows are laid out per head as [head][q|k|v][head_dim], so they are regrouped before the split into
  to_q/to_k/to_v (the new order is [q|k|v][head][head_dim]); q and k are each scaled by ch^(−1/4), i.e.
  the usual 1/√d. conv1d weights [o, i, 1] become linear weights [o, i].
- Block wiring: input_blocks[0] = conv_in; per level `num_res_blocks` × (ResBlock[, attention]) then a
  down-sampler (ResBlock(down) with `resblock_updown`, else a stride-2 conv `op`); middle_block = ResBlock,
  attention, ResBlock; per level `num_res_blocks + 1` × (ResBlock on the concatenated skip[, attention])
  plus an up-sampler (ResBlock(up), else nearest + conv `conv`); out = (norm, SiLU, conv). Attention sits
  at levels whose downsampling rate ds = 2^level is in {image_size // r for r in attention_resolutions}
  (`script_util.create_model`). diffusers: `ResnetDownsampleBlock2D` / `AttnDownBlock2D` with
  `downsample_type="resnet"`, `UNetMidBlock2D`, `ResnetUpsampleBlock2D` / `AttnUpBlock2D`.
- `learn_sigma` gives 6 output channels: ε then the variance interpolation v; DDIM reads the first 3.
- Timesteps: `rescale_timesteps` is False in P2/ILVR/guided-diffusion defaults, so the network sees the
  raw integer t ∈ 0..T−1, as diffusers does; with T = 1000 the rescale would be the identity anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

#: the number of ADM's GroupNorm groups (`guided_diffusion/nn.py: normalization`)
GROUPS = 32


class ADMConversionError(ValueError):
    """The checkpoint does not match the ADM architecture it was converted with."""


@dataclass(frozen=True)
class ADMConfig:
    """ADM `create_model` hyper-parameters (names as guided-diffusion's flags); defaults = P2 FFHQ/AFHQ-dog.

    `attention_resolutions` are in pixels, as the `--attention_resolutions` flag (16 → the 16 px level).
    `diffusion_steps` T and the linear β schedule 1e-4·1000/T … 0.02·1000/T (ADM's `get_named_beta_schedule`)
    go into the export's info; `rescale_timesteps` must be False unless T = 1000 (the model sees raw t).
    """

    image_size: int = 256
    num_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 4
    num_head_channels: int = 64
    num_heads_upsample: int = -1
    learn_sigma: bool = True
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    use_new_attention_order: bool = False
    dropout: float = 0.0
    in_channels: int = 3
    diffusion_steps: int = 1000
    rescale_timesteps: bool = False

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(int(m) * self.num_channels for m in self.channel_mult)

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        """Whether each level has attention (ADM: ds = 2^level in {image_size // r})."""
        ds = {self.image_size // int(r) for r in self.attention_resolutions}
        return tuple(2**level in ds for level in range(len(self.channel_mult)))

    def heads(self, channels: int, upsample: bool = False) -> int:
        """ADM's head count of an attention block with `channels` channels (AttentionBlock.__init__)."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        if upsample and self.num_heads_upsample != -1:
            return self.num_heads_upsample
        return self.num_heads

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channel_mult"] = list(self.channel_mult)
        out["attention_resolutions"] = list(self.attention_resolutions)
        return out


#: released checkpoints' architectures (P2 README train/sample flags; ILVR README sampling flags; the
#: guided-diffusion README's 256x256_diffusion_uncond.pt MODEL_FLAGS)
ADM_PRESETS: dict[str, ADMConfig] = {
    "p2-ffhq": ADMConfig(),
    "p2-afhqdog": ADMConfig(),
    "ilvr-ffhq": ADMConfig(),
    "ilvr-afhqdog": ADMConfig(),
    "adm-256-uncond": ADMConfig(num_channels=256, num_res_blocks=2, attention_resolutions=(32, 16, 8)),
}


def attention_head_dim(cfg: ADMConfig) -> int:
    """The one head width diffusers' `UNet2DModel` uses for every attention block (error if ADM's vary)."""
    mids = cfg.block_out_channels
    used = [(c, False) for c, a in zip(mids, cfg.attention_levels, strict=True) if a]
    used += [(c, True) for c, a in zip(mids, cfg.attention_levels, strict=True) if a]
    used.append((mids[-1], False))  # the middle block always has attention
    dims = set()
    for channels, up in used:
        heads = cfg.heads(channels, up)
        if heads < 1 or channels % heads:
            raise ADMConversionError(f"attention with {channels} channels cannot be split into {heads} heads")
        dims.add(channels // heads)
    if len(dims) != 1:
        raise ADMConversionError(
            f"ADM's attention blocks use head widths {sorted(dims)}; diffusers UNet2DModel needs one "
            "(use num_head_channels, or num_heads that give one width at every attention level)"
        )
    return dims.pop()


def validate(cfg: ADMConfig) -> None:
    """Refuse ADM variants the diffusers blocks cannot reproduce exactly, saying why."""
    if not cfg.channel_mult or any(int(m) != m or m < 1 for m in cfg.channel_mult):
        raise ADMConversionError(f"channel_mult must be positive integers, got {cfg.channel_mult}")
    if cfg.channel_mult[0] != 1:
        raise ADMConversionError(
            f"channel_mult[0] must be 1 (diffusers' time projection is block_out_channels[0] wide, ADM's "
            f"num_channels), got {cfg.channel_mult}"
        )
    bad = [c for c in cfg.block_out_channels if c % GROUPS]
    if bad:
        raise ADMConversionError(f"channels {bad} are not divisible by ADM's {GROUPS} GroupNorm groups")
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if cfg.image_size % factor:
        raise ADMConversionError(f"image_size {cfg.image_size} is not divisible by 2^(levels-1) = {factor}")
    if cfg.diffusion_steps < 1:
        raise ADMConversionError(f"diffusion_steps must be >= 1, got {cfg.diffusion_steps}")
    if cfg.rescale_timesteps and cfg.diffusion_steps != 1000:
        raise ADMConversionError(
            "rescale_timesteps=True with diffusion_steps != 1000 feeds the network t·1000/T; the injection "
            "stage feeds raw t, so such a checkpoint is not supported"
        )
    attention_head_dim(cfg)


def diffusers_config(cfg: ADMConfig) -> dict[str, Any]:
    """`UNet2DModel(**config)` arguments computing the same function as ADM's `UNetModel` under `cfg`."""
    validate(cfg)
    down, up = [], []
    for attn in cfg.attention_levels:
        plain_down, plain_up = (
            ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D")
            if cfg.resblock_updown
            else ("DownBlock2D", "UpBlock2D")
        )
        down.append("AttnDownBlock2D" if attn else plain_down)
        up.insert(0, "AttnUpBlock2D" if attn else plain_up)
    resample = "resnet" if cfg.resblock_updown else "conv"
    return {
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": tuple(down),
        "up_block_types": tuple(up),
        "mid_block_type": "UNetMidBlock2D",
        "block_out_channels": cfg.block_out_channels,
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": attention_head_dim(cfg),
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": GROUPS,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "downsample_type": resample,
        "upsample_type": resample,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "dropout": cfg.dropout,
        "act_fn": "silu",
    }


# (ADM prefix, diffusers prefix, kind, attention heads or 0)
ModulePair = tuple[str, str, str, int]


def module_pairs(cfg: ADMConfig) -> list[ModulePair]:
    """Every ADM sub-module beside its diffusers counterpart, in ADM's construction order."""
    pairs: list[ModulePair] = [
        ("time_embed.0", "time_embedding.linear_1", "copy", 0),
        ("time_embed.2", "time_embedding.linear_2", "copy", 0),
        ("input_blocks.0.0", "conv_in", "copy", 0),
    ]
    chans, attn, levels = cfg.block_out_channels, cfg.attention_levels, len(cfg.channel_mult)
    resample = "resblock" if cfg.resblock_updown else "copy"
    index = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"input_blocks.{index}.0", f"down_blocks.{level}.resnets.{j}", "resblock", 0))
            if attn[level]:
                heads = cfg.heads(chans[level])
                pairs.append(
                    (f"input_blocks.{index}.1", f"down_blocks.{level}.attentions.{j}", "attention", heads)
                )
            index += 1
        if level != levels - 1:
            suffix = "" if cfg.resblock_updown else ".op"
            target = f"down_blocks.{level}.downsamplers.0" + ("" if cfg.resblock_updown else ".conv")
            pairs.append((f"input_blocks.{index}.0{suffix}", target, resample, 0))
            index += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "resblock", 0),
        ("middle_block.1", "mid_block.attentions.0", "attention", cfg.heads(chans[-1])),
        ("middle_block.2", "mid_block.resnets.1", "resblock", 0),
    ]
    index = 0
    for up_i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"output_blocks.{index}.0", f"up_blocks.{up_i}.resnets.{j}", "resblock", 0))
            sub = 1
            if attn[level]:
                heads = cfg.heads(chans[level], upsample=True)
                pairs.append(
                    (f"output_blocks.{index}.1", f"up_blocks.{up_i}.attentions.{j}", "attention", heads)
                )
                sub = 2
            if level and j == cfg.num_res_blocks:
                suffix = "" if cfg.resblock_updown else ".conv"
                target = f"up_blocks.{up_i}.upsamplers.0" + ("" if cfg.resblock_updown else ".conv")
                pairs.append((f"output_blocks.{index}.{sub}{suffix}", target, resample, 0))
            index += 1
    pairs += [("out.0", "conv_norm_out", "copy", 0), ("out.2", "conv_out", "copy", 0)]
    return pairs


_RESBLOCK_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)

# One parameter rule: ADM key, diffusers keys, the ADM shape expected, ADM tensor → diffusers tensors.
Rule = tuple[str, tuple[str, ...], tuple[int, ...], Callable[[Tensor], tuple[Tensor, ...]]]


def _copy(a: str, d: str, target: Mapping[str, Tensor]) -> Rule:
    return a, (d,), tuple(target[d].shape), lambda t: (t,)


def _conv1d_to_linear(a: str, d: str, target: Mapping[str, Tensor]) -> Rule:
    shape = tuple(target[d].shape)
    if len(shape) == 1:
        return _copy(a, d, target)
    return a, (d,), (*shape, 1), lambda t: (t[..., 0],)


def split_qkv(t: Tensor, heads: int, legacy: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ADM's fused qkv rows (weight [3C, C(, 1)] or bias [3C]) → diffusers' q, k, v rows.

    Legacy layout (`QKVAttentionLegacy`): row = head·3d + part·d + i; new layout (`QKVAttention`):
    row = part·C + head·d + i. diffusers wants row = head·d + i in each of to_q / to_k / to_v.
    """
    if t.ndim == 3:
        t = t[..., 0]
    rest = t.shape[1:]
    width = t.shape[0] // 3
    if legacy:
        grouped = t.reshape(heads, 3, width // heads, *rest).transpose(0, 1)
    else:
        grouped = t.reshape(3, heads, width // heads, *rest)
    q, k, v = (part.reshape(width, *rest).contiguous() for part in grouped)
    return q, k, v


def _rules(pair: ModulePair, target: Mapping[str, Tensor], legacy: bool) -> list[Rule]:
    a, d, kind, heads = pair
    rules: list[Rule] = []
    if kind == "copy":
        for p in ("weight", "bias"):
            rules.append(_copy(f"{a}.{p}", f"{d}.{p}", target))
    elif kind == "resblock":
        for a_part, d_part in _RESBLOCK_PARTS:
            if f"{d}.{d_part}.weight" not in target:
                continue  # no 1×1 shortcut where channels stay (ADM: nn.Identity, no parameters)
            for p in ("weight", "bias"):
                rules.append(_copy(f"{a}.{a_part}.{p}", f"{d}.{d_part}.{p}", target))
    elif kind == "attention":
        for p in ("weight", "bias"):
            rules.append(_copy(f"{a}.norm.{p}", f"{d}.group_norm.{p}", target))
            rules.append(_conv1d_to_linear(f"{a}.proj_out.{p}", f"{d}.to_out.0.{p}", target))
            q = target[f"{d}.to_q.{p}"].shape
            shape = (3 * q[0], q[1], 1) if p == "weight" else (3 * q[0],)
            names = tuple(f"{d}.to_{x}.{p}" for x in "qkv")
            rules.append((f"{a}.qkv.{p}", names, shape, lambda t, h=heads: split_qkv(t, h, legacy)))
    else:  # pragma: no cover - module_pairs only emits the kinds above
        raise AssertionError(kind)
    return rules


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    more = f" … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{title} ({len(items)}): " + "; ".join(items[:limit]) + more


def convert_state_dict(
    adm_state: Mapping[str, Tensor], cfg: ADMConfig, unet: torch.nn.Module
) -> dict[str, Tensor]:
    """Map an ADM state dict onto `unet` (built from `diffusers_config(cfg)`); float32 tensors out.

    Every ADM key must be consumed and every diffusers parameter filled; otherwise `ADMConversionError`
    lists the first few missing and unexpected ADM keys and shape mismatches (with shapes).
    """
    target = unet.state_dict()
    legacy = not cfg.use_new_attention_order
    out: dict[str, Tensor] = {}
    missing, mismatched, used = [], [], set()
    for pair in module_pairs(cfg):
        if pair[2] == "attention":
            built = unet.get_submodule(pair[1]).heads
            if built != pair[3]:
                raise ADMConversionError(f"{pair[1]} has {built} heads, ADM's {pair[0]} has {pair[3]}")
        for a_key, d_keys, shape, fn in _rules(pair, target, legacy):
            if a_key not in adm_state:
                missing.append(f"{a_key} {shape}")
                continue
            used.add(a_key)
            tensor = adm_state[a_key]
            if tuple(tensor.shape) != shape:
                mismatched.append(f"{a_key}: checkpoint {tuple(tensor.shape)}, expected {shape}")
                continue
            for d_key, value in zip(d_keys, fn(tensor.detach().float()), strict=True):
                out[d_key] = value.contiguous()
    unexpected = [f"{k} {tuple(v.shape)}" for k, v in adm_state.items() if k not in used]
    unfilled = [k for k in target if k not in out and not missing and not mismatched]
    if missing or unexpected or mismatched or unfilled:
        parts = [
            _listing(title, items)
            for title, items in (
                ("missing ADM keys", missing),
                ("unexpected ADM keys", unexpected),
                ("shape mismatches", mismatched),
                ("diffusers parameters left unfilled", unfilled),
            )
            if items
        ]
        hint = ""
        if any(k.startswith("label_emb") for k in adm_state):
            hint = " (label_emb: a class-conditional ADM, not supported)"
        raise ADMConversionError(
            f"the checkpoint does not match this ADM architecture{hint}; check the flags "
            f"(image_size, num_channels, channel_mult, num_res_blocks, attention_resolutions, heads, "
            f"learn_sigma, use_scale_shift_norm, resblock_updown). " + " | ".join(parts)
        )
    return out
