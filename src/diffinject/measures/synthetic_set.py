"""Measurements of a synthetic set (for the report only): colour, shape and diversity of injected images.

Bias labels enter here only to *report* what the synthetic set contains; nothing feeds back into training.

- Colour (Colored MNIST): the LfF protocol colours a grayscale digit as `pixel = gray × colour`, so every
  foreground pixel divided by its brightest channel is `colour / max(colour)` whatever its stroke intensity.
  The per-channel median of those ratios over the bright pixels (robust to anti-aliased edges, uint8
  rounding and stray synthetic pixels) is matched to the nearest palette colour normalised the same way.
- Shape: a small MLP "shape probe" trained on colour-free training images (max over channels, rescaled to a
  peak of 1) with the task labels only; its prediction on a synthetic image says which digit it shows.
- Diversity: how many distinct contents/styles are used, and the effective number of contents
  (exp of the entropy of the content usage distribution).
Each measurement is a pure function: arrays in, numbers out.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffinject.data.cmnist import LFF_COLORS

MANIFEST_INT_COLUMNS = ("index", "content_index", "style_index", "label")
MANIFEST_OPTIONAL_INT_COLUMNS = ("content_label", "style_label", "content_bias", "style_bias")
#: a pixel belongs to the digit when its brightest channel reaches this fraction of the image's peak
FOREGROUND_RELATIVE = 0.5
#: below this peak brightness (in [0, 1]) an image has no foreground at all (estimate -1)
MIN_PEAK = 0.05


# ---------------------------------------------------------------------------------------------- colour
def _as_unit(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] N×C×H×W → float32 [0, 1]."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"expected images N×C×H×W, got shape {images.shape}")
    return images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images.astype(np.float32)


def normalise_by_brightness(colours: np.ndarray) -> np.ndarray:
    """Divide colours (…×3) by their brightest channel: the colour direction, independent of intensity."""
    return colours / np.clip(colours.max(axis=-1, keepdims=True), 1e-6, None)


def foreground_colour(images: np.ndarray, relative: float = FOREGROUND_RELATIVE) -> np.ndarray:
    """Robust colour direction (N×3, max channel 1) of each image's foreground; NaN rows: no foreground."""
    images = _as_unit(images)
    if images.shape[1] != 3:
        raise ValueError(f"colour estimation needs RGB images, got {images.shape[1]} channel(s)")
    pixels = images.transpose(0, 2, 3, 1).reshape(len(images), -1, 3)
    brightness = pixels.max(axis=-1)
    peak = brightness.max(axis=1)
    out = np.full((len(images), 3), np.nan, dtype=np.float32)
    for i in np.flatnonzero(peak >= MIN_PEAK):
        mask = brightness[i] >= relative * peak[i]
        out[i] = np.median(pixels[i][mask] / brightness[i][mask, None], axis=0)
    return out


def nearest_palette(
    directions: np.ndarray, palette: np.ndarray = LFF_COLORS
) -> tuple[np.ndarray, np.ndarray]:
    """(class, distance) of the nearest brightness-normalised palette colour; class -1 for NaN rows."""
    reference = normalise_by_brightness(np.asarray(palette, dtype=np.float32))
    known = ~np.isnan(directions).any(axis=1)
    distances = np.sqrt(((directions[:, None, :] - reference[None]) ** 2).sum(axis=-1))
    distances = np.nan_to_num(distances, nan=np.inf)
    classes = np.where(known, distances.argmin(axis=1), -1)
    nearest = np.where(known, distances.min(axis=1), np.nan)
    return classes.astype(np.int64), nearest


def estimate_colour_classes(images: np.ndarray, palette: np.ndarray = LFF_COLORS) -> np.ndarray:
    """Colour class of each image (nearest palette colour to its foreground direction); -1 = no foreground."""
    return nearest_palette(foreground_colour(images), palette)[0]


def palette_margin(palette: np.ndarray = LFF_COLORS) -> float:
    """Half the smallest distance between two normalised palette colours: farther than this is off-palette."""
    reference = normalise_by_brightness(np.asarray(palette, dtype=np.float64))
    distances = np.sqrt(((reference[:, None] - reference[None]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    return float(distances.min() / 2)


def _fraction(mask: np.ndarray, valid: np.ndarray) -> float | None:
    return float(mask[valid].mean()) if valid.any() else None


def colour_stats(
    estimated: np.ndarray,
    labels: np.ndarray,
    content_bias: np.ndarray | None = None,
    style_bias: np.ndarray | None = None,
    distances: np.ndarray | None = None,
    margin: float | None = None,
) -> dict[str, Any]:
    """Conflict rate (estimated colour ≠ label) and where the colour came from, over images with a colour."""
    estimated, labels = np.asarray(estimated), np.asarray(labels)
    found = estimated >= 0
    stats: dict[str, Any] = {
        "num_images": int(len(estimated)),
        "num_without_foreground": int((~found).sum()),
        "conflict_rate": _fraction(estimated != labels, found),
    }
    for role, bias in (("content", content_bias), ("style", style_bias)):
        if bias is not None:
            bias = np.asarray(bias)
            stats[f"colour_is_{role}_colour"] = _fraction(estimated == bias, found & (bias >= 0))
    if distances is not None and margin is not None:
        stats["off_palette"] = _fraction(np.nan_to_num(distances, nan=0.0) > margin, found)
    return stats


# ---------------------------------------------------------------------------------------------- shape
def shape_gray(images: np.ndarray) -> np.ndarray:
    """Colour-free images N×H×W: max over channels, each image rescaled to a peak of 1."""
    gray = _as_unit(images).max(axis=1)
    peak = gray.reshape(len(gray), -1).max(axis=1)
    return (gray / np.clip(peak, 1e-6, None)[:, None, None]).astype(np.float32)


def build_shape_probe(num_pixels: int, num_classes: int, hidden: int = 64) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(num_pixels, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, num_classes),
    )


def train_shape_probe(
    gray: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    hidden: int = 64,
    iterations: int = 150,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> torch.nn.Module:
    """Full-batch L-BFGS on an MLP (deterministic for a seed, a few seconds on a CPU for 4k MNIST digits)."""
    x = torch.from_numpy(np.ascontiguousarray(gray)).flatten(1)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = build_shape_probe(x.shape[1], num_classes, hidden)
    optimiser = torch.optim.LBFGS(
        probe.parameters(), lr=1.0, max_iter=iterations, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        penalty = sum((p**2).sum() for p in probe.parameters() if p.ndim == 2)
        loss = F.cross_entropy(probe(x), y) + weight_decay * penalty
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only fight other processes for the cores
    try:
        optimiser.step(closure)
    finally:
        torch.set_num_threads(threads)
    return probe.eval()


@torch.no_grad()
def probe_predict(probe: torch.nn.Module, gray: np.ndarray) -> np.ndarray:
    return probe(torch.from_numpy(np.ascontiguousarray(gray)).flatten(1)).argmax(1).numpy()


def shape_stats(
    predicted: np.ndarray,
    labels: np.ndarray,
    content_labels: np.ndarray | None = None,
    style_labels: np.ndarray | None = None,
) -> dict[str, float | None]:
    """How often the probe reads the synthetic label, the content's label and the style's label."""
    predicted = np.asarray(predicted)
    stats: dict[str, float | None] = {"shape_is_label": float((predicted == np.asarray(labels)).mean())}
    for role, value in (("content", content_labels), ("style", style_labels)):
        if value is not None:
            stats[f"shape_is_{role}_label"] = float((predicted == np.asarray(value)).mean())
    return stats


def recombination_stats(
    shape: np.ndarray,
    colour: np.ndarray,
    content_labels: np.ndarray | None,
    style_labels: np.ndarray | None,
    content_bias: np.ndarray | None,
    style_bias: np.ndarray | None,
    label_from: str | None,
) -> dict[str, float | None]:
    """How often an image is a *new combination*: one image's digit in the other image's colour.

    `recombination` is the one the label rule asks for (content's digit + style's colour when the label is the
    content's, the reverse when it is the style's); both directions are reported. None where inputs lack.
    """
    if any(v is None for v in (content_labels, style_labels, content_bias, style_bias)):
        return {"content_shape_style_colour": None, "style_shape_content_colour": None, "recombination": None}
    shape, colour = np.asarray(shape), np.asarray(colour)
    forward = float(((shape == content_labels) & (colour == style_bias)).mean())
    reverse = float(((shape == style_labels) & (colour == content_bias)).mean())
    chosen = {"content": forward, "style": reverse}.get(label_from or "")
    return {
        "content_shape_style_colour": forward,
        "style_shape_content_colour": reverse,
        "recombination": chosen,
    }


# ---------------------------------------------------------------------------------------------- diversity
def effective_number(indices: np.ndarray) -> float:
    """exp(entropy) of the usage distribution: how many items are used, counting uneven use fairly."""
    _, counts = np.unique(np.asarray(indices), return_counts=True)
    if counts.sum() == 0:
        return 0.0
    p = counts / counts.sum()
    return float(math.exp(-(p * np.log(p)).sum()))


def diversity_stats(content_index: np.ndarray, style_index: np.ndarray) -> dict[str, float | int]:
    return {
        "distinct_contents": int(len(np.unique(content_index))),
        "distinct_styles": int(len(np.unique(style_index))),
        "effective_contents": effective_number(content_index),
        "effective_styles": effective_number(style_index),
    }


def nominal_stats(
    labels: np.ndarray,
    content_labels: np.ndarray,
    content_bias: np.ndarray,
    style_bias: np.ndarray,
    label_from: str,
) -> dict[str, Any]:
    """Conflict rates the manifest *claims* from bias labels, not measured on the images.

    The method assumes one image carries the bias attribute into the synthetic image: the style when the
    label comes from the content, the content when it comes from the style (the reference's colour rule).
    """
    labels = np.asarray(labels)
    carrier = style_bias if label_from == "content" else content_bias
    known = np.asarray(carrier) >= 0
    return {
        "assumed_bias_carrier": "style" if label_from == "content" else "content",
        "nominal_conflict_rate": _fraction(labels != np.asarray(carrier), known),
        "label_differs_from_style_bias": _fraction(
            labels != np.asarray(style_bias), np.asarray(style_bias) >= 0
        ),
        "label_differs_from_content_bias": _fraction(
            labels != np.asarray(content_bias), np.asarray(content_bias) >= 0
        ),
        "content_is_conflicting": _fraction(
            np.asarray(content_labels) != np.asarray(content_bias), np.asarray(content_bias) >= 0
        ),
    }


def pixel_distance_stats(synthetic: np.ndarray, content: np.ndarray, style: np.ndarray) -> dict[str, float]:
    """Mean squared pixel distance (in [0, 1] units) to the content and the style image."""
    syn, con, sty = _as_unit(synthetic), _as_unit(content), _as_unit(style)
    to_content = ((syn - con) ** 2).mean(axis=(1, 2, 3))
    to_style = ((syn - sty) ** 2).mean(axis=(1, 2, 3))
    return {
        "mse_to_content": float(to_content.mean()),
        "mse_to_style": float(to_style.mean()),
        "closer_to_content": float((to_content < to_style).mean()),
    }


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Manifest:
    """An injection manifest: int columns as arrays (optional ones missing → None), absolute image paths."""

    path: Path
    columns: dict[str, np.ndarray | None]
    images: list[Path]

    def __len__(self) -> int:
        return len(self.images)


def read_manifest(path: str | Path) -> Manifest:
    """Parse `inject/manifest.csv`; a clear error names the file, the line and what was expected."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in (*MANIFEST_INT_COLUMNS, "path") if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing} in header {header}; expected the inject "
                "stage's manifest (index,content_index,style_index,label,...,path)"
            )
        reader.fieldnames = header
        present = [c for c in (*MANIFEST_INT_COLUMNS, *MANIFEST_OPTIONAL_INT_COLUMNS) if c in header]
        values: dict[str, list[int]] = {c: [] for c in present}
        images = []
        for line, row in enumerate(reader, start=2):
            for column in present:
                try:
                    values[column].append(int(str(row[column]).strip()))
                except (TypeError, ValueError):
                    raise ValueError(
                        f"{path}, line {line}: column {column!r} must be an integer, got {row[column]!r}"
                    ) from None
            if not row.get("path"):
                raise ValueError(f"{path}, line {line}: empty path")
            images.append(path.parent / row["path"].strip())
    columns: dict[str, np.ndarray | None] = dict.fromkeys(
        (*MANIFEST_INT_COLUMNS, *MANIFEST_OPTIONAL_INT_COLUMNS)
    )
    columns.update({c: np.asarray(v, dtype=np.int64) for c, v in values.items()})
    return Manifest(path, columns, images)


def load_images(paths: list[Path], channels: int = 3) -> np.ndarray:
    """uint8 N×C×H×W from image files (all the same size); an unreadable or missing file is named."""
    mode = {1: "L", 3: "RGB"}[channels]
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(mode), dtype=np.uint8)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read synthetic image {path}: {error}") from error
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"synthetic images differ in size {sorted(shapes)} (first {paths[0]})")
    return np.stack(arrays) if arrays else np.zeros((0, channels, 1, 1), dtype=np.uint8)


def generated_stats(
    shape: np.ndarray | None, colour: np.ndarray, labels: np.ndarray, distances: np.ndarray, margin: float
) -> dict[str, float | None]:
    """A generator's images against their labels (no style image to compare with, unlike injection):
    the probe reads the label, the colour conflicts with it, and both at once — a *new combination*, the
    bias-conflicting image of the right class these baselines exist to add."""
    labels, colour = np.asarray(labels), np.asarray(colour)
    found = colour >= 0
    stats: dict[str, float | None] = {
        "colour_conflicts_label": _fraction(colour != labels, found),
        "off_palette": _fraction(np.nan_to_num(distances, nan=0.0) > margin, found),
        "shape_is_label": None,
        "new_combination": None,
    }
    if shape is not None:
        reads = np.asarray(shape) == labels
        stats["shape_is_label"] = float(reads.mean())
        stats["new_combination"] = float((reads & found & (colour != labels)).mean())
    return stats
