"""UNet presets: parameter counts (as documented), standard blocks only, h-space shapes, size checks."""

from __future__ import annotations

import pytest
import torch

from diffinject.nets import UNET_PRESETS, build_unet
from diffinject.nets.unet import load_unet_export, save_unet_export

# preset -> (parameters with 3 channels, h = mid_block output C×H×W at the native size); the docstring of
# diffinject.nets.unet quotes the same numbers.
EXPECTED = {
    "cmnist-small": (637_043, (64, 8, 8)),
    "cmnist-paper": (16_056_451, (256, 8, 8)),
    "32": (35_746_307, (256, 4, 4)),
    "64": (88_217_219, (512, 8, 8)),
    "128": (90_860_931, (512, 8, 8)),
    "256": (113_673_219, (512, 8, 8)),
}
STANDARD_BLOCKS = {"DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D", "UNetMidBlock2D"}


def _h_shape(preset: str, size: int | None = None) -> tuple[int, ...]:
    """Run a forward on the meta device (no memory, no FLOPs) and read the mid-block output shape."""
    shapes: list[tuple[int, ...]] = []
    with torch.device("meta"):
        unet = build_unet(preset, size)
        side = unet.config.sample_size
        handle = unet.mid_block.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))
        out = unet(torch.zeros(1, 3, side, side), torch.zeros(1, dtype=torch.long)).sample
        handle.remove()
    assert tuple(out.shape) == (1, 3, side, side)
    return shapes[0]


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_size_blocks_and_hspace(preset: str) -> None:
    assert set(EXPECTED) == set(UNET_PRESETS)
    with torch.device("meta"):
        unet = build_unet(preset)
    params, h_shape = EXPECTED[preset]
    assert sum(p.numel() for p in unet.parameters()) == params
    used = {type(b).__name__ for b in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]}
    assert used <= STANDARD_BLOCKS
    assert _h_shape(preset) == h_shape


def test_cmnist_small_fits_the_cpu_budget_and_paper_is_17m_class() -> None:
    assert 0.5e6 <= EXPECTED["cmnist-small"][0] <= 2e6
    assert 14e6 <= EXPECTED["cmnist-paper"][0] <= 20e6


def test_256_preset_runs_224_natively() -> None:
    assert _h_shape("256", 224) == (512, 7, 7)


def test_bad_preset_and_size_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown UNet preset 'cmnist-huge'"):
        build_unet("cmnist-huge")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_unet("cmnist-small", 30)
    with pytest.raises(ValueError, match="divisible by 32"):
        build_unet("256", 200)


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
