"""`DATASET=folder`: stage configs derived from a user's own image tree (configs/folder/README.md).

The tree is read once (`data.inspect.inspect_folder`) before any stage starts. Its size picks a template set
(`configs/folder/small/` for ≤ 32 px, `large/` otherwise); `fill_config` then writes what the data decide
into the template's values: classes, bias classes, channels and image side into every classifier and data
module, and a UNet preset with its working size into the diffusion stage (and, for the injection, the data
at the diffusion model's size). Only keys the template has are filled, so a template or variant that
drops a key keeps it dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from diffinject.data.inspect import FolderFacts
from diffinject.data.sections import source_data_section

#: largest side that gets the digits recipe (MLP, cmnist-small UNet); larger images use ResNet-18.
SMALL_MAX_SIDE = 32
Headline = Literal["all", "conflicting"]
HEADLINES = ("all", "conflicting")
#: (largest side, UNet preset, the preset's side, how much its encoder shrinks) for the large template set.
LARGE_PRESETS = ((64, "64", 64, 8), (128, "128", 128, 16), (256, "256", 256, 32))


@dataclass(frozen=True)
class DiffusionGeometry:
    """UNet preset, the side the data are served at for diffusion, and the UNet's working side."""

    preset: str
    data_size: int
    model_size: int


def template_set(image_size: int) -> str:
    """'small' (digits recipe) or 'large' (ResNet-18 recipe) by the image side."""
    return "small" if image_size <= SMALL_MAX_SIDE else "large"


def diffusion_geometry(image_size: int) -> DiffusionGeometry:
    """The UNet for a side: small images run `cmnist-small` natively (padded up to a multiple of 4);

    larger ones the preset of the next size up; a side that is a multiple of the preset's downsampling factor
    runs natively (224 px on the 256 preset, as Dogs & Cats), any other side is resized to the preset's side.
    """
    if image_size <= SMALL_MAX_SIDE:
        return DiffusionGeometry("cmnist-small", image_size, 4 * math.ceil(image_size / 4))
    for limit, preset, side, factor in LARGE_PRESETS:
        if image_size <= limit:
            size = image_size if image_size % factor == 0 else side
            return DiffusionGeometry(preset, size, size)
    return DiffusionGeometry("256", 256, 256)  # larger images are resized down to the largest preset


def _set_present(mapping: dict[str, Any], values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key in mapping:
            mapping[key] = value


def fill_config(config: dict[str, Any], stage: str, facts: FolderFacts, headline: Headline) -> dict[str, Any]:
    """Write the data's facts into a resolved stage config of the folder templates (in place; returned)."""
    if headline not in HEADLINES:
        raise ValueError(f"headline={headline!r}: expected one of {', '.join(HEADLINES)}")
    geometry = diffusion_geometry(facts.image_size)
    at_diffusion_size = stage in ("diffusion", "inject")
    source = source_data_section(config)
    if source is not None and str(source["class_path"]).endswith("FolderDataModule"):
        _set_present(
            source.setdefault("init_args", {}),
            {
                "name": facts.name,
                "num_classes": facts.num_classes,
                "num_bias_classes": facts.num_bias_classes,
                "channels": facts.channels,
                "image_size": geometry.data_size if at_diffusion_size else facts.image_size,
                "unbiased_test_subset": headline,
            },
        )
    model = (config.get("model") or {}).get("init_args")
    if isinstance(model, dict):
        if stage == "diffusion":
            values = {
                "unet_preset": geometry.preset,
                "image_size": geometry.data_size,
                "model_size": geometry.model_size,
                "in_channels": facts.channels,
            }
        else:
            values = {
                "num_classes": facts.num_classes,
                "num_bias_classes": facts.num_bias_classes,
                "in_channels": facts.channels,
                "image_size": facts.image_size,
            }
        _set_present(model, values)
    return config
