"""UNet presets: the built models against the table in `diffinject.nets.unet`'s docstring.

Every preset is built (big ones on the `meta` device: no memory, no FLOPs) at its native size and at a
smaller one, and its parameter count, block layout, attention placement, output shape and h-space (the mid
block's output) are read off the model and compared with the documented table; `cmnist-small` also runs for
real on the CPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
from diffusers import UNet2DModel

from diffinject.nets import UNET_PRESETS, build_unet
from diffinject.nets import unet as unet_module
from diffinject.nets.unet import downsample_factor, load_unet_export, save_unet_export

#: exact parameter counts (3 channels); the docstring table rounds them to 0.01 M
EXACT_PARAMS = {
    "cmnist-small": 637_043,
    "cmnist-paper": 16_056_451,
    "32": 35_746_307,
    "64": 88_217_219,
    "128": 90_860_931,
    "256": 113_673_219,
}
STANDARD_BLOCKS = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "UNetMidBlock2D"}


@dataclass(frozen=True)
class Row:
    """One row of the documented table."""

    px: int
    channels: tuple[int, ...]
    layers: int
    attention_at: frozenset[int]
    params: str
    h: tuple[int, int, int]


def documented() -> dict[str, Row]:
    """The preset table of `diffinject.nets.unet.__doc__`, parsed."""
    rows: dict[str, Row] = {}
    for line in (unet_module.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 7 or cells[0] in ("preset", "") or set(cells[0]) <= {"-"}:
            continue
        name, px, channels, layers, attention, params, h = cells
        at = frozenset() if attention == "mid only" else frozenset(int(a) for a in attention.split(","))
        rows[name] = Row(
            px=int(px),
            channels=tuple(int(c) for c in channels.split(",")),
            layers=int(layers),
            attention_at=at,
            params=params,
            h=tuple(int(v) for v in h.split("×")),  # type: ignore[arg-type]
        )
    return rows


TABLE = documented()
PRESETS = sorted(UNET_PRESETS)


def alternative_size(preset: str) -> int:
    """A smaller valid side: native − downsampling factor (28 for the 32 px presets, 224 for `256`)."""
    return UNET_PRESETS[preset].sample_size - downsample_factor(preset)


def run_shapes(unet: UNet2DModel, side: int, channels: int = 3) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(output shape, h shape) of one forward at `side` px, on the model's device."""
    shapes: list[tuple[int, ...]] = []
    device = next(unet.parameters()).device
    handle = unet.mid_block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        x = torch.zeros(1, channels, side, side, device=device)
        out = unet(x, torch.zeros(1, dtype=torch.long, device=device)).sample
    finally:
        handle.remove()
    assert len(shapes) == 1
    return tuple(out.shape), shapes[0][1:]


def has_attention(block: torch.nn.Module) -> bool:
    return any(a is not None for a in getattr(block, "attentions", None) or [])


def attention_levels(unet: UNet2DModel, native: int) -> tuple[set[int], set[int]]:
    """Native resolutions whose down / up blocks carry attention (read from the built blocks)."""
    levels = len(unet.down_blocks)
    down = {native >> i for i, b in enumerate(unet.down_blocks) if has_attention(b)}
    up = {native >> (levels - 1 - j) for j, b in enumerate(unet.up_blocks) if has_attention(b)}
    return down, up


def test_docstring_table_covers_every_preset() -> None:
    assert set(TABLE) == set(UNET_PRESETS) == set(EXACT_PARAMS)


@pytest.mark.parametrize("preset", PRESETS)
def test_built_preset_matches_the_documented_row(preset: str) -> None:
    row = TABLE[preset]
    with torch.device("meta"):
        unet = build_unet(preset)
    assert unet.config.sample_size == row.px
    assert tuple(unet.config.block_out_channels) == row.channels
    assert unet.config.layers_per_block == row.layers
    params = sum(p.numel() for p in unet.parameters())
    assert params == EXACT_PARAMS[preset]
    assert f"{params / 1e6:.2f} M" == row.params
    used = {type(b).__name__ for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
    assert used <= STANDARD_BLOCKS, used
    assert attention_levels(unet, row.px) == (set(row.attention_at), set(row.attention_at))
    assert has_attention(unet.mid_block)  # "mid only" still has the mid block's attention
    with torch.device("meta"):
        out, h = run_shapes(unet, row.px)
    assert out == (1, 3, row.px, row.px)
    assert h == row.h


@pytest.mark.parametrize("preset", PRESETS)
def test_another_size_keeps_the_architecture_and_scales_h(preset: str) -> None:
    """The architecture does not depend on `sample_size`: same weights, same attention blocks."""
    row, side = TABLE[preset], alternative_size(preset)
    with torch.device("meta"):
        unet = build_unet(preset, side)
        out, h = run_shapes(unet, side)
    assert sum(p.numel() for p in unet.parameters()) == EXACT_PARAMS[preset]
    assert attention_levels(unet, row.px) == (set(row.attention_at), set(row.attention_at))
    assert out == (1, 3, side, side)
    assert h == (row.h[0], side // downsample_factor(preset), side // downsample_factor(preset))


def test_256_preset_runs_224_natively() -> None:
    assert alternative_size("256") == 224
    with torch.device("meta"):
        assert run_shapes(build_unet("256", 224), 224)[1] == (512, 7, 7)


@pytest.mark.parametrize("side", [32, 28])
def test_cmnist_small_really_runs_on_the_cpu(side: int) -> None:
    torch.manual_seed(0)
    unet = build_unet("cmnist-small", side).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        out = unet(x, torch.tensor([10, 900])).sample
        again = unet(x, torch.tensor([10, 10])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[1], again[1])  # the timestep reaches the network
    assert run_shapes(unet, side)[1] == (64, side // 4, side // 4)


def test_in_channels_sets_input_and_output() -> None:
    with torch.device("meta"):
        unet = build_unet("cmnist-small", in_channels=1)
        assert run_shapes(unet, 32, channels=1)[0] == (1, 1, 32, 32)


@pytest.mark.parametrize("preset", PRESETS)
def test_sizes_the_encoder_cannot_halve_are_clear_errors(preset: str) -> None:
    factor = downsample_factor(preset)
    assert factor == 2 ** (len(TABLE[preset].channels) - 1)
    message = rf"'{re.escape(preset)}' needs a sample_size divisible by {factor}"
    for bad in (UNET_PRESETS[preset].sample_size + factor // 2, factor // 2):
        with pytest.raises(ValueError, match=message):
            build_unet(preset, bad)
    with torch.device("meta"):
        assert run_shapes(build_unet(preset, factor), factor)[1][1:] == (1, 1)  # the smallest valid side


def test_unknown_preset_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown UNet preset 'cmnist-huge'"):
        build_unet("cmnist-huge")


def test_export_round_trip_and_missing_export(tmp_path) -> None:
    torch.manual_seed(0)
    unet = build_unet("cmnist-small").eval()
    target = save_unet_export(unet, tmp_path / "diffusion" / "unet", {"image_size": 28})
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    save_unet_export(unet, target, {"image_size": 28, "again": True})  # overwriting an export is atomic too
    loaded, info = load_unet_export(target)
    assert info == {"image_size": 28, "again": True}
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(unet(x, t).sample, loaded.eval()(x, t).sample)
    with pytest.raises(FileNotFoundError, match="not a diffusion export"):
        load_unet_export(tmp_path / "nothing")
