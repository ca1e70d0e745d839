"""Corrupted CIFAR-10 (LfF Type0; bias = corruption type), built once and cached in the folder layout.

`build_ccifar10` takes plain arrays (so it is testable without CIFAR-10) and writes
`{out}/cifar10c/{pct}/{align,conflict}/{class}/…`, `{pct}/valid/{class}/…` and
`{out}/cifar10c/test/{class}/…`. Protocol as Colored MNIST: validation held out per class from the 50k
training images (`val_fraction`), train and validation biased at `ratio` (at least one conflicting sample per
class), test corruptions spread evenly over every class. Each folder is written into a temporary sibling and
renamed when complete, so an interrupted build leaves nothing half-written and a rerun reuses what exists.
A `build.json` next to the splits records the parameters; reusing a cache built with other parameters is an
error rather than a silent mix.

Sources of `CCIFAR10DataModule`: ``folder`` reads an existing tree (ours or DisEnt's download);
``torchvision`` builds from CIFAR-10 under `root` (`cifar-10-batches-py`, as torchvision stores it) if the
tree is missing; ``auto`` uses the tree when present and otherwise builds.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from diffinject.data.base import BiasedDataModule
from diffinject.data.corruptions import TYPE0, corrupt
from diffinject.data.datasets import Transform
from diffinject.data.folder import FolderSplits, crop_flip
from diffinject.data.layout import write_split
from diffinject.data.protocol import (
    assign_biased,
    assign_uniform,
    parse_ratio,
    pct_name,
    rng_for,
    stratified_split,
)
from diffinject.data.synthetic import SyntheticControl
from diffinject.data.tempdirs import atomic_directory

log = logging.getLogger("diffinject.data")

NAME = "cifar10c"
CIFAR_DIR = "cifar-10-batches-py"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch")


def cifar10_present(root: str | Path) -> bool:
    return all((Path(root) / CIFAR_DIR / f).is_file() for f in CIFAR_FILES)


def _corrupt_cifar10(root: str | Path, error: Exception) -> ValueError:
    """Why torchvision refused a CIFAR-10 copy (which files fail its MD5 check), and the fix."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    folder = Path(root) / CIFAR_DIR
    expected = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    bad = [
        f"{folder / name} (expected MD5 {md5})"
        for name, md5 in expected
        if not check_integrity(str(folder / name), md5)
    ]
    what = (
        f"{len(bad)} file(s) are missing or fail torchvision's MD5 check: {', '.join(bad)}"
        if bad
        else f"torchvision could not read it ({type(error).__name__}: {error})"
    )
    return ValueError(
        f"CIFAR-10 in {folder} is unusable: {what}. To fix it, delete {folder} (and "
        f"{Path(root) / CIFAR10.filename} if present) and download it again: download=True (needs internet), "
        f"or fetch {CIFAR10.url} and extract it into {root}"
    )


def load_cifar10_arrays(root: str | Path, download: bool = False) -> tuple[np.ndarray, ...]:
    """CIFAR-10 as (train uint8 N×32×32×3, train labels, test images, test labels) via torchvision."""
    from torchvision.datasets import CIFAR10

    if not download and not cifar10_present(root):
        raise FileNotFoundError(
            f"CIFAR-10 not found: expected {', '.join(CIFAR_FILES)} in {Path(root) / CIFAR_DIR} "
            f"(torchvision's layout); place it there or pass download=True (needs internet)"
        )
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except Exception as error:  # noqa: BLE001 - torchvision's own errors name neither the file nor the fix
        raise _corrupt_cifar10(root, error) from error
    return (
        train.data,
        np.asarray(train.targets, dtype=np.int64),
        test.data,
        np.asarray(test.targets, dtype=np.int64),
    )


def corrupt_by_bias(images: np.ndarray, biases: np.ndarray, severity: int, seed: int, key: str) -> np.ndarray:
    """Apply corruption TYPE0[b] to every image with bias b (one seeded stream per corruption)."""
    out = np.empty_like(images)
    for b, name in enumerate(TYPE0):
        members = np.flatnonzero(biases == b)
        if members.size:
            out[members] = corrupt(images[members], name, rng_for(seed, f"{key}/{name}"), severity)
    return out


def _build_params(ratio: float, seed: int, severity: int, val_fraction: float) -> dict:
    return {
        "protocol": "lff-type0",
        "ratio": ratio,
        "seed": seed,
        "severity": severity,
        "val_fraction": val_fraction,
    }


def _items(images: np.ndarray, labels: np.ndarray, biases: np.ndarray):
    for i, (image, label, bias) in enumerate(zip(images, labels, biases, strict=True)):
        yield i, int(label), int(bias), image


def build_ccifar10(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    out_dir: str | Path,
    ratio: float,
    seed: int = 0,
    severity: int = 5,
    val_fraction: float = 0.1,
) -> Path:
    """Write CCIFAR-10 at `ratio` under `{out_dir}/cifar10c/` (skipping folders that already exist).

    Returns the dataset folder `{out_dir}/cifar10c`. Images are uint8 N×H×W×3, labels in 0..9.
    """
    pct = pct_name(ratio)
    dataset_dir = Path(out_dir) / NAME
    params = _build_params(ratio, seed, severity, val_fraction)
    with atomic_directory(dataset_dir / pct) as tmp:
        if tmp is not None:
            keep, held = stratified_split(train_labels, val_fraction, rng_for(seed, "ccifar/val-split"))
            for split, idx in (("train", keep), ("val", held)):
                labels = train_labels[idx]
                biases = assign_biased(labels, ratio, 10, rng_for(seed, f"ccifar/bias/{split}"))
                images = corrupt_by_bias(train_images[idx], biases, severity, seed, f"ccifar/{pct}/{split}")
                target = tmp if split == "train" else tmp / "valid"
                count = write_split(target, _items(images, labels, biases), by_alignment=split == "train")
                log.info("cifar10c %s: wrote %d %s images", pct, count, split)
            (tmp / "build.json").write_text(json.dumps(params, indent=1))
    with atomic_directory(dataset_dir / "test") as tmp:
        if tmp is not None:
            biases = assign_uniform(test_labels, 10, rng_for(seed, "ccifar/bias/test"))
            images = corrupt_by_bias(test_images, biases, severity, seed, "ccifar/test")
            count = write_split(tmp, _items(images, test_labels, biases), by_alignment=False)
            (dataset_dir / "test_build.json").write_text(json.dumps({**params, "ratio": None}, indent=1))
            log.info("cifar10c: wrote %d test images", count)
    return dataset_dir


def check_cached_build(dataset_dir: Path, pct: str, expected: dict) -> None:
    """Refuse a cache built with other parameters (DisEnt downloads carry no build.json and are accepted)."""
    checks = (
        (dataset_dir / pct / "build.json", expected),
        (dataset_dir / "test_build.json", {**expected, "ratio": None}),
    )
    for path, want in checks:
        if path.is_file():
            found = json.loads(path.read_text())
            diff = {k: (found.get(k), v) for k, v in want.items() if k != "protocol" and found.get(k) != v}
            if diff:
                details = ", ".join(f"{k}: cached {a} vs requested {b}" for k, (a, b) in diff.items())
                raise ValueError(
                    f"{path} was built with other parameters ({details}); delete {path.parent} to rebuild, "
                    f"or request the cached parameters"
                )


class CCIFAR10DataModule(BiasedDataModule):
    """Corrupted CIFAR-10 (32×32×3, 10 classes, bias = one of the ten Type0 corruptions, severity 5).

    Args:
        ratio: fraction of bias-conflicting train/val samples in (0, 1), or a pct name ("1pct").
        source: "auto" | "folder" | "torchvision" (see module docstring).
        severity: Hendrycks severity 1..5 (LfF's "Severity4" is 5).
        val_fraction: share of every class of CIFAR-10 train held out for validation.
        augment: RandomCrop(32, padding=4) + horizontal flip on training images (DisEnt's preprocessing).
        download: let torchvision download CIFAR-10 when building (off: nothing is fetched at run time).
    """

    name = NAME
    num_classes = 10
    image_size = 32
    channels = 3

    def __init__(
        self,
        root: str = "data",
        ratio: float | str = 0.01,
        source: Literal["auto", "folder", "torchvision"] = "auto",
        severity: int = 5,
        batch_size: int = 256,
        num_workers: int = 4,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        synthetic_control: SyntheticControl = "none",
        val_fraction: float = 0.1,
        augment: bool = True,
        download: bool = False,
        synthetic_allow_outside: bool = False,
    ) -> None:
        super().__init__(
            root,
            batch_size,
            num_workers,
            seed,
            synthetic_manifest,
            on_bad_image,
            synthetic_control,
            synthetic_allow_outside,
        )
        if source not in ("auto", "folder", "torchvision"):
            raise ValueError(f"source must be auto, folder or torchvision, got {source!r}")
        if not 1 <= severity <= 5:
            raise ValueError(f"severity must be 1..5 (Hendrycks scale), got {severity}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.ratio, self.pct = parse_ratio(ratio)
        self.source, self.severity, self.val_fraction = source, severity, val_fraction
        self.augment, self.download = augment, download
        self.resolved_source: str | None = None
        self._splits: FolderSplits | None = None
        self._checked = False

    @property
    def dataset_dir(self) -> Path:
        return self.root / self.name

    def _needs_build(self) -> bool:
        return not ((self.dataset_dir / self.pct).is_dir() and (self.dataset_dir / "test").is_dir())

    def prepare_data(self) -> None:
        """Build the cache if needed (Lightning calls this on one process per node before `setup`)."""
        self.ensure_built()

    def ensure_built(self) -> None:
        """Ensure `{root}/cifar10c/{pct}` and `test` exist (built if the source allows), with our params."""
        if self._checked:
            return
        expected = _build_params(self.ratio, self.seed, self.severity, self.val_fraction)
        if self.source != "folder" and self._needs_build():
            if self.source == "auto" and not self.download and not cifar10_present(self.root):
                raise FileNotFoundError(
                    f"no Corrupted CIFAR-10 at {self.dataset_dir / self.pct} (+ {self.dataset_dir / 'test'}) "
                    f"and no CIFAR-10 to build it from in {self.root / CIFAR_DIR}; put CIFAR-10 there "
                    f"(torchvision layout), pass download=True, or point root at a DisEnt cifar10c download"
                )
            log.info("cifar10c: building %s from CIFAR-10 in %s (once; cached)", self.pct, self.root)
            arrays = load_cifar10_arrays(self.root, self.download)
            build_ccifar10(*arrays, self.root, self.ratio, self.seed, self.severity, self.val_fraction)
            self.resolved_source = "torchvision"
        elif self.resolved_source is None:
            self.resolved_source = "folder"
        if self.source == "auto":
            log.info("cifar10c: source='auto' resolved to %r (%s)", self.resolved_source, self.dataset_dir)
        check_cached_build(self.dataset_dir, self.pct, expected)
        self._checked = True

    def splits(self) -> FolderSplits:
        if self._splits is None:
            self.ensure_built()
            self._splits = FolderSplits(
                str(self.root),
                self.name,
                self.pct,
                self.num_classes,
                self.channels,
                self.image_size,
                self.on_bad_image,
                num_bias_classes=10,
            )
        return self._splits

    def folder_source(self) -> Path:
        return self.dataset_dir / self.pct

    def identity(self) -> dict[str, Any]:
        return {
            **super().identity(),
            "ratio": self.ratio,
            "seed": self.seed,
            "severity": self.severity,
            "val_fraction": self.val_fraction,
            "source": os.path.abspath(self.dataset_dir),
        }

    def train_transform(self) -> Transform | None:
        return crop_flip(self.image_size, 4) if self.augment else None

    def _build_train(self) -> tuple[Dataset, Dataset]:
        return self.splits().train(self.train_transform())

    def _build_val(self) -> Dataset:
        return self.splits().val()

    def _build_test(self) -> Dataset:
        return self.splits().test()
