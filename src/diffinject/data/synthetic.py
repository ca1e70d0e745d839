"""Synthetic-image manifests (written by the inject stage) read back as a training dataset.

The CSV has a header with at least `index,label,path` (extra columns such as content_index, style_index,
content_label, style_label are kept out of the way). `path` is relative to the CSV's folder (an absolute path
is accepted when it points inside that folder); paths that leave the folder are refused unless explicitly
allowed (`allow_outside`, the data modules' `synthetic_allow_outside`), since a manifest naming files
anywhere on the disk is almost always a mistake (a copied or hand-edited manifest). Indices are >= 0, and
neither an index nor an image may appear twice.
Rows are ordered by their `index` column, so a manifest merged from per-rank shards in any row order gives the
same dataset; the item index of row r (in that order) is `index_offset + r`, and the bias is unknown (-1).

Two controls (the data modules' `synthetic_control`) replace what the manifest's images or labels carry and
keep the set's size, order and indices, deterministically (fixed seed, no dependence on rank or world size):
`uniform_colour` serves every row as one colour field drawn uniformly from [0, 1]^C (seeded by the row's
manifest index), labels unchanged; `shuffle_labels` permutes the manifest's labels, images unchanged.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffinject.data.datasets import ImageFileDataset, TensorImageDataset, Transform

REQUIRED_COLUMNS = ("index", "label", "path")
EXPECTED = "a CSV with header containing index,label,path (paths relative to the CSV's folder)"
SyntheticControl = Literal["none", "uniform_colour", "shuffle_labels"]
SYNTHETIC_CONTROLS: tuple[str, ...] = ("none", "uniform_colour", "shuffle_labels")
#: the controls' fixed seed (uniform colours are drawn from (CONTROL_SEED, manifest index))
CONTROL_SEED = 0


@dataclass(frozen=True)
class SyntheticManifest:
    """Validated manifest rows, sorted by the manifest's `index` column."""

    csv_path: Path
    indices: np.ndarray
    labels: np.ndarray
    paths: list[Path]

    def subset(self, keep: np.ndarray) -> SyntheticManifest:
        """Rows where `keep` is True (used to drop unreadable images under on_bad_image='skip')."""
        paths = [p for p, k in zip(self.paths, keep, strict=True) if k]
        return SyntheticManifest(self.csv_path, self.indices[keep], self.labels[keep], paths)


def _as_int(value: str, column: str, line: int, csv_path: Path) -> int:
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        raise ValueError(
            f"{csv_path}, line {line}: column '{column}' must be an integer, got {value!r}"
        ) from None


def _image_path(raw: str, csv_path: Path, line: int, allow_outside: bool) -> Path:
    """`raw` against the CSV's folder, lexically (symlinks inside the folder are the user's choice)."""
    folder = os.path.normpath(os.path.abspath(csv_path.parent))
    path = os.path.normpath(os.path.join(folder, raw))  # an absolute `raw` replaces the folder
    if not allow_outside and os.path.commonpath([folder, path]) != folder:
        raise ValueError(
            f"{csv_path}, line {line}: image {raw} is outside the manifest's folder {folder} (a '..' or "
            f"absolute path); the inject stage writes paths inside it. If this is intended, set "
            f"synthetic_allow_outside=True (data.init_args.synthetic_allow_outside)"
        )
    return Path(path)


def read_synthetic_manifest(
    csv_path: str | Path, num_classes: int, allow_outside: bool = False
) -> SyntheticManifest:
    """Parse and validate a manifest; every problem raises an error naming the file, the line and the rule."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"synthetic manifest {csv_path} does not exist; expected {EXPECTED}")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"synthetic manifest {csv_path} lacks column(s) {', '.join(missing)}; found header {header}, "
                f"expected {EXPECTED}"
            )
        reader.fieldnames = header
        rows = []
        first_line: dict[int, int] = {}
        path_line: dict[Path, int] = {}
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise ValueError(f"{csv_path}, line {line}: row has fewer fields than the header {header}")
            index = _as_int(row["index"], "index", line, csv_path)
            label = _as_int(row["label"], "label", line, csv_path)
            if index < 0:
                raise ValueError(f"{csv_path}, line {line}: index {index} is negative; indices are 0, 1, …")
            if not 0 <= label < num_classes:
                raise ValueError(
                    f"{csv_path}, line {line}: label {label} is outside [0, {num_classes}) for this dataset"
                )
            if index in first_line:
                raise ValueError(
                    f"{csv_path}, line {line}: duplicate index {index} (first on line {first_line[index]})"
                )
            first_line[index] = line
            raw_path = row["path"].strip()
            if not raw_path:
                raise ValueError(f"{csv_path}, line {line}: empty path")
            image_path = _image_path(raw_path, csv_path, line, allow_outside)
            if image_path in path_line:
                raise ValueError(
                    f"{csv_path}, line {line}: image {image_path} is also on line {path_line[image_path]}; "
                    f"each synthetic image may appear once (a duplicated row would weigh it twice)"
                )
            path_line[image_path] = line
            if not image_path.is_file():
                raise FileNotFoundError(
                    f"{csv_path}, line {line}: image {image_path} does not exist "
                    f"(paths are relative to the CSV's folder {csv_path.parent})"
                )
            rows.append((index, label, image_path))
    if not rows:
        raise ValueError(f"synthetic manifest {csv_path} has a header but no rows; expected {EXPECTED}")
    rows.sort(key=lambda r: r[0])
    return SyntheticManifest(
        csv_path=csv_path,
        indices=np.array([r[0] for r in rows], dtype=np.int64),
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        paths=[r[2] for r in rows],
    )


def check_synthetic_control(control: str) -> None:
    if control not in SYNTHETIC_CONTROLS:
        raise ValueError(f"synthetic_control must be one of {', '.join(SYNTHETIC_CONTROLS)}, got {control!r}")


def shuffled_labels(labels: np.ndarray, seed: int = CONTROL_SEED) -> np.ndarray:
    """The labels under one random permutation (fixed seed): same multiset, rows get others' labels."""
    return np.asarray(labels)[np.random.default_rng(seed).permutation(len(labels))]


def uniform_colour_images(
    indices: np.ndarray, channels: int, image_size: int, seed: int = CONTROL_SEED
) -> torch.Tensor:
    """uint8 N×C×H×W colour fields, row r's colour uniform in [0, 1]^C from (seed, indices[r]), rounded to
    8 bits. The pixels are an expanded view of the N×C colours, so no image-sized memory is allocated."""
    colours = np.stack(
        [np.random.default_rng([seed, int(i) % 2**63]).random(channels) for i in indices]
    ).reshape(len(indices), channels)
    colours_u8 = torch.from_numpy(np.rint(colours * 255.0).astype(np.uint8))
    return colours_u8[:, :, None, None].expand(-1, -1, image_size, image_size)


def synthetic_dataset(
    manifest: SyntheticManifest,
    channels: int,
    image_size: int,
    index_offset: int,
    transform: Transform | None = None,
    control: SyntheticControl = "none",
) -> Dataset:
    """Synthetic images as dataset items with bias -1 and indices continuing after the real train split;
    `control` swaps the images for uniform colour fields or permutes the labels (module doc)."""
    check_synthetic_control(control)
    labels = shuffled_labels(manifest.labels) if control == "shuffle_labels" else manifest.labels
    biases = np.full(len(manifest.paths), -1, dtype=np.int64)
    if control == "uniform_colour":
        images = uniform_colour_images(manifest.indices, channels, image_size)
        return TensorImageDataset(images, labels, biases, transform=transform, index_offset=index_offset)
    return ImageFileDataset(
        manifest.paths,
        labels,
        biases,
        channels=channels,
        image_size=image_size,
        transform=transform,
        index_offset=index_offset,
    )
