"""Datasets distributed as image folders (DisEnt/BiasEnsemble layout): generic module and presets.

`FolderSplits` reads one `{root}/{name}/{pct}` tree into datasets whose images are decoded once, at setup
(`data.decoded`: in memory under `memory_cap_gib`, else a memory-mapped array file in the cache folder), not
in every epoch. The CMNIST and CCIFAR-10 modules reuse it for their folder sources.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from torch.utils.data import Dataset
from torchvision.transforms import v2

from diffinject.data.base import BadImagePolicy, BiasedDataModule, screen_images
from diffinject.data.datasets import ImageFileDataset, Transform
from diffinject.data.decoded import CACHE_DIR_NAME, DEFAULT_MEMORY_CAP_GIB, decoded_split
from diffinject.data.layout import FolderLayout, ImageRecords, check_biases, check_classes, scan_images
from diffinject.data.synthetic import SyntheticControl

log = logging.getLogger("diffinject.data")


def crop_flip(image_size: int, padding: int = 4) -> Transform:
    """DisEnt's training augmentation after the resize: RandomCrop(size, padding) + horizontal flip."""
    return v2.Compose([v2.RandomCrop(image_size, padding=padding), v2.RandomHorizontalFlip()])


class FolderSplits:
    """Scans and validates the splits of one folder dataset; builds datasets on demand.

    Each split is checked once at setup (names, folders, label and bias ranges, image headers, or full decodes
    under `on_bad_image='skip'`), so a bad file is named before training rather than in a worker mid-epoch.
    The files that pass are then decoded once (`data.decoded.decoded_split`); `decode_once=False` keeps the
    per-item decode in every epoch (`ImageFileDataset`). `cache_dir` (default: `{root}/{name}/.diffinject-
    cache`) holds the array files of splits above `memory_cap_gib`; `num_workers` processes decode big splits.
    """

    def __init__(
        self,
        root: str,
        name: str,
        pct: str,
        num_classes: int,
        channels: int,
        image_size: int,
        on_bad_image: BadImagePolicy,
        num_bias_classes: int | None = None,
        memory_cap_gib: float = DEFAULT_MEMORY_CAP_GIB,
        cache_dir: str | Path | None = None,
        num_workers: int = 0,
        decode_once: bool = True,
    ) -> None:
        self.layout = FolderLayout(root, name, pct)
        self.num_classes = num_classes
        self.num_bias_classes = num_classes if num_bias_classes is None else num_bias_classes
        self.channels = channels
        self.image_size = image_size
        self.on_bad_image = on_bad_image
        self.memory_cap_gib = memory_cap_gib
        self.cache_dir = Path(cache_dir) if cache_dir else self.layout.dataset_dir / CACHE_DIR_NAME
        self.num_workers = num_workers
        self.decode_once = decode_once

    def _records(self, directories: list, what: str) -> ImageRecords:
        records = scan_images(directories, what)
        check_classes(records, self.num_classes, what)
        check_biases(records, self.num_bias_classes, what)
        keep = screen_images(records.paths, what, self.on_bad_image, self.channels, self.image_size)
        records = records.subset(keep)
        check_classes(records, self.num_classes, what)  # skipping may have emptied a class
        return records

    def _dataset(self, records: ImageRecords, what: str, split_dir: Path) -> ImageFileDataset:
        """The split's items, decoded once unless `decode_once` is off (no transform: callers add it)."""
        if not self.decode_once:
            return ImageFileDataset(
                records.paths, records.labels, records.biases, self.channels, self.image_size
            )
        base = self.layout.dataset_dir
        return decoded_split(
            records.paths,
            records.labels,
            records.biases,
            self.channels,
            self.image_size,
            what,
            self.memory_cap_gib,
            self.cache_dir,
            split_dir.relative_to(base).as_posix().replace("/", "-"),  # "1pct-train", "1pct-valid", "test"
            base,
            self.num_workers,
        )

    def train(self, transform: Transform | None) -> tuple[ImageFileDataset, ImageFileDataset]:
        """(augmented, plain) views of one decoded training split."""
        what = f"training split {self.layout.pct_dir}"
        records = self._records(self.layout.train_dirs(), what)
        plain = self._dataset(records, what, self.layout.pct_dir / "train")
        return plain.with_transform(transform), plain

    def val(self) -> ImageFileDataset:
        valid = self.layout.valid_dir()
        what = f"validation split {valid}"
        return self._dataset(self._records([valid], what), what, valid)

    def test(self) -> ImageFileDataset:
        test = self.layout.test_dir()
        what = f"test split {test}"
        return self._dataset(self._records([test], what), what, test)


class FolderDataModule(BiasedDataModule):
    """Any dataset in the DisEnt layout under `{root}/{name}/{pct}`.

    Images are resized to `image_size` (square) on decode; training adds RandomCrop(image_size, padding) and a
    horizontal flip when `augment` is True. No normalisation (networks normalise themselves).
    `unbiased_test_subset` names the report's headline: the whole test split ("all", when it is balanced) or
    its bias-conflicting images ("conflicting", BFFHQ's convention); every group is reported either way.
    `num_bias_classes` bounds the bias values in the file names (default: num_classes), as the metrics do.
    Every split is decoded once, at setup: held in memory when its decoded pixels fit `memory_cap_gib` (GiB,
    per split), else converted once to a memory-mapped `.npy` in `cache_dir` (default
    `{root}/{name}/.diffinject-cache`; re-read when the tree's files change; an unwritable folder means the
    per-item decode, with a warning). `decode_once: false` decodes every image in every epoch instead.
    """

    def __init__(
        self,
        root: str,
        name: str,
        pct: str,
        image_size: int = 224,
        num_classes: int = 2,
        channels: int = 3,
        augment: bool = True,
        crop_padding: int = 4,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        synthetic_control: SyntheticControl = "none",
        unbiased_test_subset: Literal["all", "conflicting"] = "all",
        num_bias_classes: int | None = None,
        synthetic_allow_outside: bool = False,
        memory_cap_gib: float = DEFAULT_MEMORY_CAP_GIB,
        cache_dir: str | None = None,
        decode_once: bool = True,
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
        if image_size < 1 or num_classes < 2:
            raise ValueError(f"need image_size >= 1 and num_classes >= 2, got {image_size} and {num_classes}")
        if num_bias_classes is not None and num_bias_classes < 1:
            raise ValueError(f"num_bias_classes must be >= 1 (null: num_classes), got {num_bias_classes}")
        self.num_bias_classes = num_classes if num_bias_classes is None else num_bias_classes
        if unbiased_test_subset not in ("all", "conflicting"):
            raise ValueError(
                f"unbiased_test_subset must be 'all' or 'conflicting', got {unbiased_test_subset!r}"
            )
        self.unbiased_test_subset = unbiased_test_subset
        if not memory_cap_gib >= 0:
            raise ValueError(f"memory_cap_gib must be >= 0 (0: never in memory), got {memory_cap_gib}")
        self.memory_cap_gib, self.cache_dir, self.decode_once = memory_cap_gib, cache_dir, bool(decode_once)
        self.name, self.pct = name, pct
        self.image_size, self.num_classes, self.channels = image_size, num_classes, channels
        self.augment, self.crop_padding = augment, crop_padding
        self._splits: FolderSplits | None = None

    def splits(self) -> FolderSplits:
        if self._splits is None:
            self._splits = FolderSplits(
                str(self.root),
                self.name,
                self.pct,
                self.num_classes,
                self.channels,
                self.image_size,
                self.on_bad_image,
                self.num_bias_classes,
                memory_cap_gib=self.memory_cap_gib,
                cache_dir=self.cache_dir,
                num_workers=self.num_workers,
                decode_once=self.decode_once,
            )
        return self._splits

    def folder_source(self) -> Path:
        return self.root / self.name / self.pct

    def identity(self) -> dict[str, Any]:
        source = os.path.abspath(self.root / self.name)
        return {**super().identity(), "num_bias_classes": self.num_bias_classes, "source": source}

    def train_transform(self) -> Transform | None:
        return crop_flip(self.image_size, self.crop_padding) if self.augment else None

    def _build_train(self) -> tuple[Dataset, Dataset]:
        return self.splits().train(self.train_transform())

    def _build_val(self) -> Dataset:
        return self.splits().val()

    def _build_test(self) -> Dataset:
        return self.splits().test()


class BFFHQDataModule(FolderDataModule):
    """BFFHQ: target age (0 young, 1 old), bias gender; 224 px.

    The whole test split is served and reported; by the dataset's convention its "unbiased accuracy" is the
    accuracy on the conflicting test images (`unbiased_test_subset == "conflicting"`).
    """

    unbiased_test_subset = "conflicting"

    def __init__(
        self,
        root: str = "data",
        pct: str = "0.5pct",
        image_size: int = 224,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        synthetic_control: SyntheticControl = "none",
        synthetic_allow_outside: bool = False,
        memory_cap_gib: float = DEFAULT_MEMORY_CAP_GIB,
        cache_dir: str | None = None,
        decode_once: bool = True,
    ) -> None:
        super().__init__(
            root,
            "bffhq",
            pct,
            image_size,
            2,
            3,
            augment,
            4,
            batch_size,
            num_workers,
            seed,
            synthetic_manifest,
            on_bad_image,
            synthetic_control,
            "conflicting",
            synthetic_allow_outside=synthetic_allow_outside,
            memory_cap_gib=memory_cap_gib,
            cache_dir=cache_dir,
            decode_once=decode_once,
        )


class DogsCatsDataModule(FolderDataModule):
    """Dogs & Cats (BiasEnsemble): target species, bias fur colour; 224 px; pct "1pct" or "5pct"."""

    def __init__(
        self,
        root: str = "data",
        pct: str = "1pct",
        image_size: int = 224,
        augment: bool = True,
        batch_size: int = 64,
        num_workers: int = 4,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        synthetic_control: SyntheticControl = "none",
        synthetic_allow_outside: bool = False,
        memory_cap_gib: float = DEFAULT_MEMORY_CAP_GIB,
        cache_dir: str | None = None,
        decode_once: bool = True,
    ) -> None:
        super().__init__(
            root,
            "dogs_and_cats",
            pct,
            image_size,
            2,
            3,
            augment,
            4,
            batch_size,
            num_workers,
            seed,
            synthetic_manifest,
            on_bad_image,
            synthetic_control,
            synthetic_allow_outside=synthetic_allow_outside,
            memory_cap_gib=memory_cap_gib,
            cache_dir=cache_dir,
            decode_once=decode_once,
        )
