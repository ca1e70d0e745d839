"""Colour audit of a Colored MNIST synthetic set: is each synthetic digit bias-conflicting? (JSON to stdout)

The CMNIST bias attribute is the digit's colour. For every image of an injection manifest: foreground =
pixels whose brightest channel exceeds `--threshold`; its mean colour, normalised by its brightest channel
(digits are colour × grayscale stroke), is matched to the nearest palette colour (`LFF_COLORS`, the same
normalisation). Reports the fraction whose colour class differs from the synthetic label (bias-conflicting,
the point of the method), and how often the colour follows the style or the content image.

    python benchmarks/cmnist_synthetic_colour.py runs/cmnist/1pct/inject/manifest.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from diffinject.data.cmnist import LFF_COLORS


def _normalise(colours: np.ndarray) -> np.ndarray:
    return colours / np.clip(colours.max(axis=-1, keepdims=True), 1e-6, None)


def colour_class(image: np.ndarray, threshold: float) -> int:
    """Nearest palette index of the mean foreground colour of an H×W×3 uint8 image (-1: no foreground)."""
    pixels = image.reshape(-1, 3).astype(np.float64) / 255.0
    foreground = pixels[pixels.max(axis=1) > threshold]
    if len(foreground) == 0:
        return -1
    mean = _normalise(foreground.mean(axis=0))
    return int(np.argmin(((_normalise(LFF_COLORS) - mean) ** 2).sum(axis=1)))


def audit(manifest: Path, threshold: float = 0.25) -> dict:
    with manifest.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{manifest} has no rows")
    images = (np.asarray(Image.open(manifest.parent / r["path"]).convert("RGB")) for r in rows)
    colours = np.array([colour_class(image, threshold) for image in images])
    labels = np.array([int(r["label"]) for r in rows])
    result = {
        "manifest": str(manifest),
        "images": len(rows),
        "no_foreground": int((colours < 0).sum()),
        "colour_differs_from_label": float((colours != labels).mean()),
    }
    for role in ("style", "content"):
        bias_key = f"{role}_bias"
        if bias_key in rows[0] and int(rows[0][bias_key]) >= 0:
            bias = np.array([int(r[bias_key]) for r in rows])
            result[f"colour_equals_{role}_colour"] = float((colours == bias).mean())
        label_key = f"{role}_label"
        if label_key in rows[0]:
            result[f"label_equals_{role}_label"] = float(
                (labels == np.array([int(r[label_key]) for r in rows])).mean()
            )
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("manifest", type=Path)
    parser.add_argument(
        "--threshold", type=float, default=0.25, help="foreground: brightest channel above this"
    )
    args = parser.parse_args(argv)
    result = audit(args.manifest, args.threshold)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
