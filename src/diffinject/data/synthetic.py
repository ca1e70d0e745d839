"""Synthetic-image manifests (written by the inject stage) read back as a training dataset.

The CSV has a header with at least `index,label,path` (extra columns such as content_index, style_index,
content_label, style_label are kept out of the way; `content_index` is read for the `content_copy` control).
`path` is relative to the CSV's folder (an absolute path is accepted when it points inside that folder); paths
that leave the folder are refused unless explicitly allowed (`allow_outside`, the data modules'
`synthetic_allow_outside`), since a manifest naming files anywhere on the disk is almost always a mistake (a
copied or hand-edited manifest). Indices are >= 0, and neither an index nor an image may appear twice.
Rows are ordered by their `index` column, so a manifest merged from per-rank shards in any row order gives the
same dataset; the item index of row r (in that order) is `index_offset + r`, and the bias is unknown (-1).

Three controls (the data modules' `synthetic_control`) replace what the manifest's images or labels carry and
keep the set's size, order and indices, deterministically (fixed seed, no dependence on rank or world size):
`uniform_colour` serves every row as one colour field drawn uniformly from [0, 1]^C (seeded by the row's
manifest index), labels unchanged; `shuffle_labels` permutes the manifest's labels, images unchanged;
`content_copy` serves every row as its content image itself, the original training image at the row's
`content_index` (a position in the training split without augmentation, as the inject stage's pairs use it),
unchanged but for the training transform, with the row's label: top-K oversampling, what the synthetic slots
buy without any generator. A manifest without a `content_index` column cannot serve it and is refused.
"""

from __future__ import annotations

import csv
import json
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
SyntheticControl = Literal["none", "uniform_colour", "shuffle_labels", "content_copy"]
SYNTHETIC_CONTROLS: tuple[str, ...] = ("none", "uniform_colour", "shuffle_labels", "content_copy")
CONTENT_COLUMN = "content_index"
#: the controls' fixed seed (uniform colours are drawn from (CONTROL_SEED, manifest index))
CONTROL_SEED = 0


@dataclass(frozen=True)
class SyntheticManifest:
    """Validated manifest rows, sorted by the manifest's `index` column."""

    csv_path: Path
    indices: np.ndarray
    labels: np.ndarray
    paths: list[Path]
    #: the rows' `content_index` (training-split positions); read only when asked (`content_copy`)
    content_indices: np.ndarray | None = None

    def subset(self, keep: np.ndarray) -> SyntheticManifest:
        """Rows where `keep` is True (used to drop unreadable images under on_bad_image='skip')."""
        paths = [p for p, k in zip(self.paths, keep, strict=True) if k]
        content = None if self.content_indices is None else self.content_indices[keep]
        return SyntheticManifest(self.csv_path, self.indices[keep], self.labels[keep], paths, content)


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
    csv_path: str | Path, num_classes: int, allow_outside: bool = False, content_index: bool = False
) -> SyntheticManifest:
    """Parse and validate a manifest; every problem raises an error naming the file, the line and the rule.

    `content_index`: also read that column (required then; the `content_copy` control serves those images).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"synthetic manifest {csv_path} does not exist; expected {EXPECTED}")
    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in (reader.fieldnames or [])]
        required = (*REQUIRED_COLUMNS, CONTENT_COLUMN) if content_index else REQUIRED_COLUMNS
        missing = [c for c in required if c not in header]
        if missing:
            needed = f" (synthetic_control='content_copy' serves the image at each row's {CONTENT_COLUMN})"
            raise ValueError(
                f"synthetic manifest {csv_path} lacks column(s) {', '.join(missing)}; found header {header}, "
                f"expected {EXPECTED}" + (needed if CONTENT_COLUMN in missing else "")
            )
        reader.fieldnames = header
        rows = []
        first_line: dict[int, int] = {}
        path_line: dict[Path, int] = {}
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if any(row.get(c) is None for c in required):
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
            content = -1
            if content_index:
                content = _as_int(row[CONTENT_COLUMN], CONTENT_COLUMN, line, csv_path)
                if content < 0:
                    raise ValueError(f"{csv_path}, line {line}: {CONTENT_COLUMN} {content} is negative")
            rows.append((index, label, image_path, content))
    if not rows and not gate_accepted_none(csv_path):
        raise ValueError(f"synthetic manifest {csv_path} has a header but no rows; expected {EXPECTED}")
    rows.sort(key=lambda r: r[0])
    return SyntheticManifest(
        csv_path=csv_path,
        indices=np.array([r[0] for r in rows], dtype=np.int64),
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        paths=[r[2] for r in rows],
        content_indices=np.array([r[3] for r in rows], dtype=np.int64) if content_index else None,
    )


def gate_accepted_none(csv_path: Path) -> bool:
    """Whether an empty manifest is the inject stage's gate output for a set it rejected whole.

    An empty manifest is an error (a truncated or hand-made file would silently turn the debias stage into a
    baseline), except the gate's `manifest_accepted.csv` when the `injection_check.json` beside it records
    that the gate accepted nothing: then the emptiness is a decision, explained there, and the debias stage
    reacts to it (`if_no_synthetic`).
    """
    check = csv_path.parent / "injection_check.json"
    if csv_path.name != "manifest_accepted.csv" or not check.is_file():
        return False
    try:
        gate = json.loads(check.read_text()).get("gate") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return gate.get("accepted") == 0


def check_synthetic_control(control: str) -> None:
    """Refuse an unknown control at construction, before any data is read (a typo would train on the
    manifest's own data and be reported as a control)."""
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
    rows = [np.random.default_rng([seed, int(i) % 2**63]).random(channels) for i in indices]
    # an empty manifest (the gate accepted none) gives an empty set, like the generator's own rows
    colours = np.stack(rows).reshape(len(rows), channels) if rows else np.zeros((0, channels))
    colours_u8 = torch.from_numpy(np.rint(colours * 255.0).astype(np.uint8))
    return colours_u8[:, :, None, None].expand(-1, -1, image_size, image_size)


class ContentCopyDataset(Dataset):
    """Row r → the training image at `content_indices[r]` under `transform`, with row r's label, bias -1 and
    index `index_offset + r` (the `content_copy` control: the manifest's slots, the generator left out)."""

    def __init__(
        self,
        source: Dataset,
        content_indices: np.ndarray,
        labels: np.ndarray,
        transform: Transform | None,
        index_offset: int,
    ) -> None:
        if not hasattr(source, "with_transform"):  # the pixels must pass through the training transform
            raise TypeError(f"content_copy needs a training split with `with_transform`, got {type(source)}")
        self.source = source.with_transform(transform)
        self.content_indices = np.asarray(content_indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.biases = np.full(len(self.labels), -1, dtype=np.int64)
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, r: int) -> dict:
        item = self.source[int(self.content_indices[r])]
        return {**item, "label": int(self.labels[r]), "bias": -1, "index": r + self.index_offset}


def content_copy_dataset(
    manifest: SyntheticManifest, source: Dataset | None, transform: Transform | None, index_offset: int
) -> ContentCopyDataset:
    """The `content_copy` control's items; a manifest without content indices, or naming an image outside the
    training split (made for another dataset, ratio or seed), is an error naming the file."""
    if manifest.content_indices is None:
        raise ValueError(
            f"synthetic_control='content_copy' needs the {CONTENT_COLUMN} column of synthetic manifest "
            f"{manifest.csv_path} (read it with content_index=True); the inject stage writes it"
        )
    if source is None:
        raise ValueError("synthetic_control='content_copy' needs the training split (content_source)")
    outside = np.flatnonzero(manifest.content_indices >= len(source))
    if outside.size:
        row = int(outside[0])
        raise ValueError(
            f"synthetic manifest {manifest.csv_path}: {outside.size} row(s) name a {CONTENT_COLUMN} outside "
            f"the training split of {len(source)} images, e.g. index {int(manifest.indices[row])}: "
            f"{CONTENT_COLUMN} {int(manifest.content_indices[row])}; was it made for another dataset, ratio "
            f"or seed?"
        )
    return ContentCopyDataset(source, manifest.content_indices, manifest.labels, transform, index_offset)


def synthetic_dataset(
    manifest: SyntheticManifest,
    channels: int,
    image_size: int,
    index_offset: int,
    transform: Transform | None = None,
    control: SyntheticControl = "none",
    content_source: Dataset | None = None,
) -> Dataset:
    """Synthetic images as dataset items with bias -1 and indices continuing after the real train split;
    `control` swaps the images for uniform colour fields or the content images (`content_source`: the
    training split without augmentation, in index order), or permutes the labels (module doc)."""
    check_synthetic_control(control)
    if control == "content_copy":
        return content_copy_dataset(manifest, content_source, transform, index_offset)
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
