"""What a folder dataset is, read from its tree: classes, bias classes, channels, image size, split sizes.

The pipeline derives every stage config of `DATASET=folder` from these facts, so a user's own dataset in the
DisEnt layout (`data.layout`) needs no hand-written configs. Everything is read before any stage starts, and
each layout problem is an error naming the path and the rule. Image headers only are read (no decode), at
most `max_headers` files spread evenly over the splits, so inspecting 100k images takes seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from diffinject.data.datasets import BadImageError, open_image
from diffinject.data.layout import FolderLayout, ImageRecords, check_classes, scan_images

#: PIL modes that hold one channel of intensity; anything else is read as RGB.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "P;L"})


@dataclass(frozen=True)
class FolderFacts:
    """A folder dataset as the pipeline sees it (JSON-able; written to the run root as `dataset.json`)."""

    root: str
    name: str
    pct: str
    num_classes: int
    num_bias_classes: int
    channels: int
    image_size: int
    train: int
    conflicting: int
    valid: int
    test: int
    sizes: dict[str, int] = field(default_factory=dict)  # "WxH" → count among the inspected headers
    modes: dict[str, int] = field(default_factory=dict)  # PIL mode → count among the inspected headers
    #: the test split as scanned here: the preflight decodes these without scanning (and warning) again
    test_paths: list[Path] = field(default_factory=list, repr=False, compare=False)

    @property
    def conflicting_share(self) -> float:
        return self.conflicting / self.train if self.train else 0.0

    def summary(self) -> str:
        return (
            f"{self.root}/{self.name}/{self.pct}: {self.num_classes} classes, {self.num_bias_classes} bias "
            f"classes, {self.channels}×{self.image_size} px; train {self.train:,} "
            f"({100 * self.conflicting_share:.2f} % conflicting), valid {self.valid:,}, test {self.test:,}"
        )

    def to_json(self) -> str:
        payload = {k: v for k, v in asdict(self).items() if k != "test_paths"}  # a count is enough there
        return json.dumps(payload, indent=2, sort_keys=True) + "\n"


def _headers(paths: list[Path], limit: int) -> tuple[Counter, Counter]:
    """(size, mode) counts over at most `limit` evenly spaced files; unreadable headers are errors."""
    chosen = (
        paths
        if len(paths) <= limit
        else [paths[i] for i in np.linspace(0, len(paths) - 1, limit).astype(int)]
    )
    sizes: Counter = Counter()
    modes: Counter = Counter()
    for path in chosen:
        try:
            with open_image(path) as image:
                sizes[f"{image.width}x{image.height}"] += 1
                modes[image.mode] += 1
        except BadImageError:
            raise
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise ValueError(f"cannot read the image header of {path}: {error}") from error
    return sizes, modes


def _square_side(sizes: Counter, where: str) -> int:
    """The side of the most common size; non-square or mixed sizes need an explicit `image_size`."""
    (common, _), *others = sizes.most_common()
    width, height = (int(v) for v in common.split("x"))
    if width != height or others:
        seen = ", ".join(f"{size} ×{count}" for size, count in sizes.most_common(5))
        raise ValueError(
            f"{where}: images are not all one square size ({seen}); every stage resizes to one square "
            f"side, so pass it explicitly (--image-size <px>; make: PIPELINE_ARGS='--image-size <px>')"
        )
    return width


def _bias_classes(records: list[ImageRecords], where: str) -> int:
    biases = np.concatenate([r.biases for r in records])
    if biases.min() < 0:
        raise ValueError(f"{where}: bias value {int(biases.min())} < 0 in a file name; expected 0, 1, …")
    return int(biases.max()) + 1


def inspect_folder(
    root: str | Path,
    name: str,
    pct: str,
    image_size: int | None = None,
    channels: int | None = None,
    num_classes: int | None = None,
    num_bias_classes: int | None = None,
    max_headers: int = 2000,
) -> FolderFacts:
    """Scan `{root}/{name}/{pct}` (and its valid/test splits); explicit arguments override what is read.

    Classes are `max(label) + 1` over the training split, and every split must hold all of them; bias classes
    `max(bias) + 1` over all splits (at least the number of classes the metrics group by); channels 1 when
    every inspected image is grayscale, else 3; the image side is the common square size of the images.
    """
    layout = FolderLayout(root, name, pct)
    train = scan_images(layout.train_dirs(), f"training split {layout.pct_dir}")
    valid_dir, test_dir = layout.valid_dir(), layout.test_dir()
    valid = scan_images([valid_dir], f"validation split {valid_dir}")
    test = scan_images([test_dir], f"test split {test_dir}")
    for records, what in ((train, layout.pct_dir), (valid, valid_dir), (test, test_dir)):
        if len(records.paths) == 0:
            raise ValueError(f"{what} holds no images; expected files named {{idx}}_{{label}}_{{bias}}.png")
    classes = num_classes if num_classes is not None else int(train.labels.max()) + 1
    if classes < 2:
        raise ValueError(f"{layout.pct_dir}: found {classes} class(es); a classifier needs at least 2")
    for records, what in ((train, layout.pct_dir), (valid, valid_dir), (test, test_dir)):
        check_classes(records, classes, f"{what}")
    found_bias = _bias_classes([train, valid, test], str(layout.dataset_dir))
    bias_classes = num_bias_classes if num_bias_classes is not None else found_bias
    if bias_classes < found_bias:
        raise ValueError(
            f"num_bias_classes={bias_classes} but {layout.dataset_dir} has bias values up to {found_bias - 1}"
        )
    sizes, modes = _headers(train.paths + valid.paths + test.paths, max_headers)
    side = image_size if image_size is not None else _square_side(sizes, str(layout.dataset_dir))
    if side < 8:
        raise ValueError(f"image_size={side}: too small for any of the networks (at least 8 px)")
    if channels is None:
        channels = 1 if set(modes) <= GRAYSCALE_MODES else 3
    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: expected 1 (grayscale) or 3 (RGB)")
    conflict_dir = layout.pct_dir / "conflict"
    conflicting = sum(1 for path in train.paths if conflict_dir in path.parents)
    return FolderFacts(
        root=str(root),
        name=name,
        pct=pct,
        num_classes=classes,
        num_bias_classes=bias_classes,
        channels=channels,
        image_size=int(side),
        train=len(train.paths),
        conflicting=conflicting,
        valid=len(valid.paths),
        test=len(test.paths),
        sizes=dict(sizes.most_common()),
        modes=dict(modes.most_common()),
        test_paths=list(test.paths),
    )
