"""The DisEnt/BiasEnsemble folder layout: locating, scanning and writing it.

```
{root}/{name}/{pct}/align/{class}/{idx}_{label}_{bias}.png
{root}/{name}/{pct}/conflict/{class}/{idx}_{label}_{bias}.png
{root}/{name}/{pct}/valid/...   or   {root}/{name}/valid/...   (flat or one folder per class)
{root}/{name}/test/...                                          (flat or one folder per class)
```
Label and bias are the last two `_`-separated integers of the file stem, so folder names may contain `_`.
Files are ordered by their leading `idx` when it is an integer, then by path, which makes the order
deterministic and lets an exported dataset read back in its original index order.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("diffinject.data")

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
FILENAME_PATTERN = "{idx}_{label}_{bias}.png, where label and bias are the last two '_'-separated integers"
EXPECTED_LAYOUT = """expected layout:
  {root}/{name}/{pct}/align/{class}/{idx}_{label}_{bias}.png
  {root}/{name}/{pct}/conflict/{class}/{idx}_{label}_{bias}.png
  {root}/{name}/{pct}/valid/[{class}/]{idx}_{label}_{bias}.png   (or {root}/{name}/valid/...)
  {root}/{name}/test/[{class}/]{idx}_{label}_{bias}.png"""
SPLIT_DIRS = frozenset({"valid", "test"})
ALIGNMENT_DIRS = frozenset({"align", "conflict"})
#: files our builders write next to the images (never images themselves)
METADATA_FILES = frozenset({"export_info.json", "build.json"})


@dataclass(frozen=True)
class ImageRecords:
    """Sorted image files of one split with the label and bias parsed from their names."""

    paths: list[Path]
    labels: np.ndarray
    biases: np.ndarray

    def subset(self, keep: np.ndarray) -> ImageRecords:
        return ImageRecords(
            [p for p, k in zip(self.paths, keep, strict=True) if k], self.labels[keep], self.biases[keep]
        )


def parse_label_bias(stem: str) -> tuple[int, int] | None:
    """`(label, bias)` from a stem like "123_4_7", or None when the last two fields are not integers."""
    fields = stem.split("_")
    if len(fields) < 2:
        return None
    try:
        return int(fields[-2]), int(fields[-1])
    except ValueError:
        return None


def _order_key(path: Path) -> tuple[int, int, str]:
    head = path.stem.split("_", 1)[0]
    return (0, int(head), str(path)) if head.isdigit() else (1, 0, str(path))


def _regular_or_missing(path: Path) -> bool:
    """False for a FIFO, socket or device (opening a FIFO blocks until a writer comes: forever, at setup).
    A broken link counts as a file, so the image check names it as unreadable, as before."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _walk_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(regular files, other non-directory entries) under `directory`; hidden ones (".DS_Store",
    ".ipynb_checkpoints/", temp and cache folders) and our own metadata files left out."""
    found, irregular = [], []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name not in METADATA_FILES:
                path = Path(dirpath) / name
                (found if _regular_or_missing(path) else irregular).append(path)
    return found, irregular


def folder_problem(path: Path, directory: Path, label: int, bias: int) -> str | None:
    """The rule `path` breaks, if any: an integer class folder must equal the label, files under align/ must
    have label == bias and files under conflict/ label != bias (a file moved or renamed by hand)."""
    between = path.relative_to(directory).parts[:-1]
    if between and between[-1].isdigit() and int(between[-1]) != label:
        return f"label {label} in class folder '{between[-1]}' (the class folder must equal the label)"
    split = next((part for part in reversed((directory.name, *between)) if part in ALIGNMENT_DIRS), None)
    if split == "align" and label != bias:
        return f"under align/ but label {label} != bias {bias} (align/ holds aligned files, label == bias)"
    if split == "conflict" and label == bias:
        return (
            f"under conflict/ but label {label} == bias {bias} "
            f"(conflict/ holds bias-conflicting files, label != bias)"
        )
    return None


def scan_images(directories: Sequence[Path], what: str) -> ImageRecords:
    """All image files under `directories` (recursively), parsed and in deterministic order.

    Raises ValueError listing up to five file names that do not follow the naming pattern; files that are not
    images (by extension) are left out and counted in a warning, and so are entries that are not regular
    files (FIFOs, sockets, devices), which are never opened.
    """
    images, others, unparsed, misplaced, irregular = [], [], [], [], []
    for directory in directories:
        files, skipped = _walk_files(directory)
        irregular += skipped
        for path in files:
            parsed = parse_label_bias(path.stem)
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                others.append(path)
            elif parsed is None:
                unparsed.append(path)
            else:
                images.append(path)
                problem = folder_problem(path, directory, *parsed)
                if problem is not None:
                    misplaced.append(f"{problem}: {path}")
    if unparsed:
        raise ValueError(
            f"{len(unparsed)} file name(s) in {what} do not parse; "
            f"expected {FILENAME_PATTERN}:{_listing([str(p) for p in unparsed])}"
        )
    if misplaced:
        raise ValueError(
            f"{len(misplaced)} file(s) in {what} contradict their folders:{_listing(misplaced)}\n"
            f"the file name says label and bias ({FILENAME_PATTERN}); fix the name or move the file"
        )
    if irregular:
        log.warning(
            "%s: skipped %d item(s) that are not regular files (FIFO, socket or device; never opened):%s",
            what,
            len(irregular),
            _listing([str(p) for p in irregular]),
        )
    if others:
        log.warning(
            "%s: ignored %d non-image file(s) (extensions other than %s), e.g. %s",
            what,
            len(others),
            ", ".join(sorted(IMAGE_EXTENSIONS)),
            others[0],
        )
    images.sort(key=_order_key)
    parsed = [parse_label_bias(p.stem) for p in images]
    return ImageRecords(
        paths=images,
        labels=np.array([lb[0] for lb in parsed], dtype=np.int64),
        biases=np.array([lb[1] for lb in parsed], dtype=np.int64),
    )


def _listing(lines: Sequence[str], limit: int = 5) -> str:
    more = f"\n  ... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n  " + "\n  ".join(lines[:limit]) + more


def check_biases(records: ImageRecords, num_bias_classes: int, what: str) -> None:
    """Every bias value must lie in [0, num_bias_classes) (the metrics group by it)."""
    bad = (records.biases < 0) | (records.biases >= num_bias_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what}: bias {int(records.biases[first])} is outside [0, {num_bias_classes}) "
            f"(e.g. {records.paths[first]}, {int(bad.sum())} file(s) in all); set num_bias_classes to the "
            f"number of bias values (default: num_classes) or fix the file names"
        )


def check_classes(records: ImageRecords, num_classes: int, what: str) -> None:
    """Every class 0..num_classes-1 must be present and no label may fall outside that range."""
    if len(records.paths) == 0:
        raise ValueError(f"{what} contains no images; expected {FILENAME_PATTERN}")
    bad = records.labels[(records.labels < 0) | (records.labels >= num_classes)]
    if bad.size:
        example = records.paths[int(np.flatnonzero(records.labels == bad[0])[0])]
        raise ValueError(
            f"{what}: label {int(bad[0])} is outside [0, {num_classes}) (e.g. {example}); "
            f"check num_classes or the file names"
        )
    missing = sorted(set(range(num_classes)) - set(records.labels.tolist()))
    if missing:
        raise ValueError(
            f"{what}: class(es) {missing} have no images; every one of {num_classes} classes is needed"
        )


class FolderLayout:
    """Resolved folders of one `{root}/{name}/{pct}` dataset; each missing piece is a clear error."""

    def __init__(self, root: str | Path, name: str, pct: str) -> None:
        self.root, self.name, self.pct = Path(root), name, pct
        self.dataset_dir = self.root / name
        if not self.dataset_dir.is_dir():
            state = "exists" if self.root.is_dir() else "does not exist either"
            raise FileNotFoundError(
                f"dataset folder {self.dataset_dir} not found (root {self.root} {state}); "
                f"{EXPECTED_LAYOUT.replace('{root}', str(self.root)).replace('{name}', name)}"
            )
        self.pct_dir = self.dataset_dir / pct
        if not self.pct_dir.is_dir():
            available = self.available_pcts(self.dataset_dir)
            raise FileNotFoundError(
                f"no {pct!r} folder in {self.dataset_dir}; available: {available or 'none'}"
            )

    @staticmethod
    def available_pcts(dataset_dir: Path) -> list[str]:
        return sorted(
            p.name
            for p in dataset_dir.iterdir()
            if p.is_dir() and p.name not in SPLIT_DIRS and not p.name.startswith(".")
        )

    def train_dirs(self) -> list[Path]:
        dirs = [self.pct_dir / "align", self.pct_dir / "conflict"]
        missing = [str(d) for d in dirs if not d.is_dir()]
        if missing:
            raise FileNotFoundError(f"missing training folder(s) {', '.join(missing)}; {EXPECTED_LAYOUT}")
        return dirs

    def valid_dir(self) -> Path:
        candidates = [self.pct_dir / "valid", self.dataset_dir / "valid"]
        for candidate in candidates:
            if candidate.is_dir():
                return candidate
        raise FileNotFoundError(
            f"no validation folder: neither {candidates[0]} nor {candidates[1]} exists; {EXPECTED_LAYOUT}"
        )

    def test_dir(self) -> Path:
        test = self.dataset_dir / "test"
        if not test.is_dir():
            raise FileNotFoundError(f"no test folder {test}; {EXPECTED_LAYOUT}")
        return test


# --------------------------------------------------------------------------- writing
def image_filename(index: int, label: int, bias: int) -> str:
    return f"{index}_{label}_{bias}.png"


def save_png(path: Path, image: torch.Tensor | np.ndarray) -> None:
    """Write a uint8 image given as C×H×W tensor or H×W×C / H×W array."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
        if image.ndim == 3:
            image = np.transpose(image, (1, 2, 0))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8 pixels, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    Image.fromarray(image).save(path, format="PNG")


def write_split(
    split_dir: Path,
    items: Iterator[tuple[int, int, int, torch.Tensor | np.ndarray]],
    by_alignment: bool,
) -> int:
    """Write (index, label, bias, uint8 image) items under `split_dir`; returns how many.

    `by_alignment=True` writes the training layout `{align|conflict}/{label}/...`; otherwise `{label}/...`.
    """
    count = 0
    made: set[Path] = set()
    for index, label, bias, image in items:
        if by_alignment:
            if bias < 0:
                raise ValueError(
                    f"item {index} has unknown bias {bias}; cannot place it in align/ or conflict/"
                )
            folder = split_dir / ("align" if label == bias else "conflict") / str(label)
        else:
            folder = split_dir / str(label)
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        save_png(folder / image_filename(index, label, bias), image)
        count += 1
    return count
