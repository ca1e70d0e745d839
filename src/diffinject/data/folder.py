"""Datasets distributed as image folders (DisEnt/BiasEnsemble layout): generic module and presets.

`FolderSplits` reads one `{root}/{name}/{pct}` tree into `ImageFileDataset`s (paths only; pixels are decoded
in the DataLoader workers). The CMNIST and CCIFAR-10 modules reuse it for their folder sources.
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
    ) -> None:
        self.layout = FolderLayout(root, name, pct)
        self.num_classes = num_classes
        self.num_bias_classes = num_classes if num_bias_classes is None else num_bias_classes
        self.channels = channels
        self.image_size = image_size
        self.on_bad_image = on_bad_image

    def _records(self, directories: list, what: str) -> ImageRecords:
        records = scan_images(directories, what)
        check_classes(records, self.num_classes, what)
        check_biases(records, self.num_bias_classes, what)
        keep = screen_images(records.paths, what, self.on_bad_image, self.channels, self.image_size)
        records = records.subset(keep)
        check_classes(records, self.num_classes, what)  # skipping may have emptied a class
        return records

    def _dataset(self, records: ImageRecords, transform: Transform | None) -> ImageFileDataset:
        return ImageFileDataset(
            records.paths, records.labels, records.biases, self.channels, self.image_size, transform
        )

    def train(self, transform: Transform | None) -> tuple[ImageFileDataset, ImageFileDataset]:
        dirs = self.layout.train_dirs()
        records = self._records(dirs, f"training split {self.layout.pct_dir}")
        return self._dataset(records, transform), self._dataset(records, None)

    def val(self) -> ImageFileDataset:
        valid = self.layout.valid_dir()
        return self._dataset(self._records([valid], f"validation split {valid}"), None)

    def test(self) -> ImageFileDataset:
        test = self.layout.test_dir()
        return self._dataset(self._records([test], f"test split {test}"), None)


class FolderDataModule(BiasedDataModule):
    """Any dataset in the DisEnt layout under `{root}/{name}/{pct}`.

    Images are resized to `image_size` (square) on decode; training adds RandomCrop(image_size, padding) and a
    horizontal flip when `augment` is True. No normalisation (networks normalise themselves).
    `unbiased_test_subset` names the report's headline: the whole test split ("all", when it is balanced) or
    its bias-conflicting images ("conflicting", BFFHQ's convention); every group is reported either way.
    `num_bias_classes` bounds the bias values in the file names (default: num_classes), as the metrics do.
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
        )
