"""UNet presets (diffusers `UNet2DModel`) per image size, and the offline export format of a trained UNet.

Every preset uses only the standard blocks `DownBlock2D` / `AttnDownBlock2D`, `UNetMidBlock2D` and
`UpBlock2D` / `AttnUpBlock2D`, so the injection stage can split the forward pass into encoder, mid block
(the h-space) and decoder. Each down block but the last halves the resolution, so a preset with L levels
needs a side divisible by 2^(L−1); the architecture itself does not depend on `sample_size`.

| preset       | px  | block_out_channels           | layers | attention at | params   | h (mid out) |
|--------------|-----|------------------------------|--------|--------------|----------|-------------|
| cmnist-small | 32  | 16, 32, 64                   | 1      | mid only     | 0.64 M   | 64×8×8      |
| cmnist-paper | 32  | 64, 128, 256                 | 2      | 16, 8        | 16.06 M  | 256×8×8     |
| 32           | 32  | 128, 256, 256, 256           | 2      | 16           | 35.75 M  | 256×4×4     |
| 64           | 64  | 128, 256, 384, 512           | 2      | 16, 8        | 88.22 M  | 512×8×8     |
| 128          | 128 | 128, 128, 256, 384, 512      | 2      | 16, 8        | 90.86 M  | 512×8×8     |
| 256          | 256 | 128, 128, 256, 256, 512, 512 | 2      | 16           | 113.67 M | 512×8×8     |

(parameter counts measured with 3 input channels; `tests/test_unet_presets.py` pins them.)
`cmnist-small` is sized for the quick CPU profile (0.17 s a step at batch 64 on 2 idle cores); `cmnist-paper`
matches the ≈17 M-parameter reference run and is meant for a GPU. The `256` preset follows P2's FFHQ/AFHQ
layout (128 channels, multipliers 1,1,2,2,4,4, attention at 16 px), giving the same 512×8×8 h-space
(P2's ADM variant has 93 M: it uses scale-shift norm and resblock up/down, not the diffusers blocks).
224 px images (Dogs & Cats) run the `256` preset **at 224 natively** (`sample_size=224`, divisible by 32,
h = 512×7×7) instead of being resized or padded to 256: no resampling and ~23% less compute.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

INFO_FILENAME = "diffusion_info.json"


@dataclass(frozen=True)
class UNetPreset:
    """Architecture of one preset; `attention_at` lists the resolutions (px) whose blocks use attention."""

    sample_size: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    attention_at: tuple[int, ...]
    norm_num_groups: int = 32
    attention_head_dim: int = 64
    dropout: float = 0.0


UNET_PRESETS: dict[str, UNetPreset] = {
    "cmnist-small": UNetPreset(32, (16, 32, 64), 1, (), norm_num_groups=8, attention_head_dim=32),
    "cmnist-paper": UNetPreset(32, (64, 128, 256), 2, (16, 8), dropout=0.1),
    "32": UNetPreset(32, (128, 256, 256, 256), 2, (16,), dropout=0.1),
    "64": UNetPreset(64, (128, 256, 384, 512), 2, (16, 8), dropout=0.1),
    "128": UNetPreset(128, (128, 128, 256, 384, 512), 2, (16, 8), dropout=0.1),
    "256": UNetPreset(256, (128, 128, 256, 256, 512, 512), 2, (16,), dropout=0.1),
}


def downsample_factor(preset: str) -> int:
    """How much the encoder shrinks the image (a valid side must be divisible by it)."""
    return 2 ** (len(get_preset(preset).block_out_channels) - 1)


def get_preset(preset: str) -> UNetPreset:
    if preset not in UNET_PRESETS:
        raise ValueError(f"unknown UNet preset {preset!r}; expected one of {sorted(UNET_PRESETS)}")
    return UNET_PRESETS[preset]


def build_unet(preset: str, sample_size: int | None = None, in_channels: int = 3) -> UNet2DModel:
    """A fresh ε-prediction `UNet2DModel` for `preset` (default size: the preset's native size)."""
    spec = get_preset(preset)
    size = spec.sample_size if sample_size is None else int(sample_size)
    factor = downsample_factor(preset)
    if size < factor or size % factor != 0:
        raise ValueError(f"UNet preset {preset!r} needs a sample_size divisible by {factor}, got {size}")
    down, up = [], []
    resolution = size
    for _ in spec.block_out_channels:
        # Attention placement is defined at the native size so a preset keeps its architecture at any size.
        native_res = resolution * spec.sample_size // size
        attn = native_res in spec.attention_at
        down.append("AttnDownBlock2D" if attn else "DownBlock2D")
        up.insert(0, "AttnUpBlock2D" if attn else "UpBlock2D")
        resolution //= 2
    return UNet2DModel(
        sample_size=size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2D",
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        norm_num_groups=spec.norm_num_groups,
        attention_head_dim=spec.attention_head_dim,
        dropout=spec.dropout,
    )


def save_unet_export(unet: UNet2DModel, export_dir: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write `unet.save_pretrained` + `diffusion_info.json` to `export_dir` atomically.

    Written into a temporary sibling folder first and renamed into place, so a reader never sees a
    half-written export and an interrupted run leaves the previous export intact.
    """
    target = Path(export_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO_FILENAME).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_unet_export(export_dir: str | os.PathLike) -> tuple[UNet2DModel, dict[str, Any]]:
    """Load an export written by `save_unet_export` (offline) and its info (preprocessing, schedule)."""
    path = Path(export_dir)
    info_path = path / INFO_FILENAME
    if not (path / "config.json").is_file() or not info_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusion export: expected config.json and {INFO_FILENAME} "
            "(run the diffusion stage first: diffinject fit --config configs/<dataset>/diffusion.yaml)"
        )
    info = read_export_info(info_path)
    unet = UNet2DModel.from_pretrained(path, local_files_only=True, use_safetensors=uses_safetensors(path))
    return unet, info


def uses_safetensors(path: Path) -> bool:
    """Whether an export's weights are safetensors; a pickled `.bin` alone loads with a warning.

    With safetensors present nothing is unpickled (`use_safetensors=True` never falls back to a `.bin`
    beside it). diffusers reads a `.bin` with `torch.load(weights_only=True)`, so a crafted payload is
    refused rather than run; the warning is for the format, which newer diffusers may stop reading.
    """
    if any(path.glob("*.safetensors")):
        return True
    pickled = sorted(path.glob("*.bin"))
    if pickled:
        warnings.warn(
            f"{path}: loading pickled weights {pickled[0].name} (weights_only: tensors only, no code runs); "
            "re-save them as safetensors (UNet2DModel.save_pretrained(dir, safe_serialization=True))",
            stacklevel=3,
        )
        return False
    raise FileNotFoundError(f"{path} holds no UNet weights (*.safetensors or *.bin beside config.json)")


def read_export_info(info_path: str | os.PathLike) -> dict[str, Any]:
    """`diffusion_info.json` as a dict; a file that is not a JSON object is named with what it should hold.

    A raw `JSONDecodeError` would name neither the file nor the fix (a truncated copy, a hand edit).
    """
    path = Path(info_path)
    expected = (
        "expected the JSON object the diffusion stage writes beside the weights (preprocess, schedule, "
        "image size: nets/unet.py save_unet_export); re-export the UNet (rerun the diffusion stage, or "
        "`diffinject-convert` for a converted model) or restore the file"
    )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {expected}") from error
    if not isinstance(info, dict):
        raise ValueError(f"{path} holds a JSON {type(info).__name__}, not an object; {expected}")
    return info
