"""Synthetic-image manifests (written by the inject stage) read back as a training dataset.

The CSV has a header with at least `index,label,path` (extra columns such as content_index, style_index,
content_label, style_label are kept out of the way). `path` is relative to the CSV's folder, or absolute.
Rows are ordered by their `index` column, so a manifest merged from per-rank shards in any row order gives the
same dataset; the item index of row r (in that order) is `index_offset + r`, and the bias is unknown (-1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffinject.data.datasets import ImageFileDataset, Transform

REQUIRED_COLUMNS = ("index", "label", "path")
EXPECTED = "a CSV with header containing index,label,path (paths relative to the CSV's folder)"


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


def read_synthetic_manifest(csv_path: str | Path, num_classes: int) -> SyntheticManifest:
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
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            if any(row.get(c) is None for c in REQUIRED_COLUMNS):
                raise ValueError(f"{csv_path}, line {line}: row has fewer fields than the header {header}")
            index = _as_int(row["index"], "index", line, csv_path)
            label = _as_int(row["label"], "label", line, csv_path)
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
            image_path = Path(raw_path)
            if not image_path.is_absolute():
                image_path = csv_path.parent / image_path
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


def synthetic_dataset(
    manifest: SyntheticManifest,
    channels: int,
    image_size: int,
    index_offset: int,
    transform: Transform | None = None,
) -> ImageFileDataset:
    """Synthetic images as dataset items with bias -1 and indices continuing after the real train split."""
    return ImageFileDataset(
        manifest.paths,
        manifest.labels,
        np.full(len(manifest.paths), -1, dtype=np.int64),
        channels=channels,
        image_size=image_size,
        transform=transform,
        index_offset=index_offset,
    )
