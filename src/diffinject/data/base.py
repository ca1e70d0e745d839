"""`BiasedDataModule`: the LightningDataModule every dataset of the project subclasses.

A subclass sets `name`, `pct`, `num_classes`, `image_size`, `channels` in `__init__` (configs and the CLI read
them before `setup`) and implements three builders: `_build_train` -> (augmented train, ordered train without
augmentation), `_build_val`, `_build_test`. The base class adds what every stage needs on top: the synthetic
manifest appended to the training split (debias stage), split-size and conflict-count logging, and the four
dataloaders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffinject.data.datasets import (
    BadImageError,
    LabeledConcatDataset,
    Transform,
    check_image,
    conversion_summary,
)
from diffinject.data.protocol import conflict_summary
from diffinject.data.synthetic import (
    SyntheticControl,
    check_synthetic_control,
    read_synthetic_manifest,
    synthetic_dataset,
)

log = logging.getLogger("diffinject.data")

BadImagePolicy = Literal["error", "skip"]
#: what each synthetic control serves instead of the manifest's data (the setup log says it)
CONTROL_DESCRIPTIONS = {
    "uniform_colour": "uniform colour fields, labels kept",
    "shuffle_labels": "manifest labels permuted, images kept",
    "content_copy": "each row's content image (the training image at content_index), labels kept",
}


def screen_images(
    paths: Sequence[str | Path],
    what: str,
    policy: BadImagePolicy,
    channels: int,
    image_size: int | None,
    log_conversions: bool = True,
) -> np.ndarray:
    """Check every file of a split once, at setup; returns which to keep.

    "skip" decodes each file (as the loader would) and drops the failures, logging a count and the reasons;
    "error" reads the headers only and raises BadImageError listing unreadable or decompression-bomb sized
    files (damaged pixel data then fails in the loader, naming the file). Either way the conversions the
    loader will make (mode, 16-bit, size) are logged in one line, so nothing is changed without a word.
    """
    checks = [check_image(p, channels, decode=policy == "skip") for p in paths]
    bad = [(str(p), c.problem) for p, c in zip(paths, checks, strict=True) if c.problem is not None]
    if bad:
        shown = "\n  ".join(f"{p}: {problem}" for p, problem in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        if policy == "error":
            raise BadImageError(
                f"{len(bad)} image(s) in {what} cannot be used:\n  {shown}{more}\nfix or remove them, or set "
                f"on_bad_image='skip' to drop unusable files (they are counted in the log)"
            )
        log.warning(
            "on_bad_image='skip': dropped %d unreadable image(s) from %s:\n  %s%s",
            len(bad),
            what,
            shown,
            more,
        )
    usable = [c for c in checks if c.problem is None]
    summary = conversion_summary(usable, channels, image_size) if log_conversions else None
    if summary:
        log.warning("%s: %s", what, summary)
    return np.array([c.problem is None for c in checks], dtype=bool)


class BiasedDataModule(LightningDataModule):
    """Base data module: items are `{"image": float32 C×H×W in [0, 1], "label", "bias", "index"}`.

    Args:
        root: folder holding the datasets (and where built datasets are cached).
        batch_size: samples per batch for every loader.
        num_workers: DataLoader worker processes (images decode there); persistent when > 0.
        seed: data seed (split and bias assignment of generated datasets); independent of the global seed.
        synthetic_manifest: CSV of synthetic images (index,label,path) appended to the training split only,
            with `index = num_train_original + row` and `bias = -1`.
        on_bad_image: "error" raises on an unreadable image, naming it; "skip" decodes every file at setup,
            drops the unreadable ones and logs how many (see `screen_images`).
        synthetic_control: "none" (default), or a control experiment on the synthetic set: "uniform_colour"
            (every synthetic image replaced by one colour field, uniform in [0, 1]^C, labels kept),
            "shuffle_labels" (the manifest's labels permuted, images kept) or "content_copy" (every row
            served as the training image at its `content_index`, through the training transform, with the
            row's label: top-K oversampling without a generator); fixed seed, rank-independent.
        synthetic_allow_outside: accept manifest paths outside the manifest's folder ('..' or absolute); off,
            such a path is an error (the inject stage only writes paths inside its folder).
    """

    name: str = "dataset"
    pct: str = ""
    num_classes: int = 0
    image_size: int = 0
    channels: int = 3
    #: which test images give the dataset's "unbiased accuracy" ("conflicting" for BFFHQ); all are reported.
    unbiased_test_subset: Literal["all", "conflicting"] = "all"

    def __init__(
        self,
        root: str = "data",
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: BadImagePolicy = "error",
        synthetic_control: SyntheticControl = "none",
        synthetic_allow_outside: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.root = Path(root)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.synthetic_manifest = synthetic_manifest
        self.on_bad_image: BadImagePolicy = on_bad_image
        check_synthetic_control(synthetic_control)
        self.synthetic_control: SyntheticControl = synthetic_control
        self.synthetic_allow_outside = bool(synthetic_allow_outside)
        self.train_dataset: Dataset | None = None
        self.train_eval_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self.num_train_original: int | None = None

    # ----------------------------------------------------------------- subclass hooks
    def _build_train(self) -> tuple[Dataset, Dataset]:
        """Return (train with augmentation, train without augmentation); same items, same order."""
        raise NotImplementedError

    def _build_val(self) -> Dataset:
        raise NotImplementedError

    def _build_test(self) -> Dataset:
        raise NotImplementedError

    def train_transform(self) -> Transform | None:
        """Augmentation applied to uint8 C×H×W training images (also to synthetic ones); None = none."""
        return None

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "predict") and self.train_eval_dataset is None:
            train, train_eval = self._build_train()
            self.num_train_original = len(train_eval)
            self._log_split("train", train_eval)
            if self.synthetic_manifest:
                synthetic = self._synthetic_part(train_eval)
                train = LabeledConcatDataset([train, synthetic])
                self._log_split("train + synthetic", train)
            self.train_dataset, self.train_eval_dataset = train, train_eval
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build_val()
            self._log_split("val", self.val_dataset)
        if stage in (None, "test") and self.test_dataset is None:
            self.test_dataset = self._build_test()
            self._log_split("test", self.test_dataset)

    def _synthetic_part(self, train_eval: Dataset) -> Dataset:
        """The manifest's rows as training items (`train_eval`: the content images `content_copy` serves)."""
        control = self.synthetic_control
        manifest = read_synthetic_manifest(
            self.synthetic_manifest,
            self.num_classes,
            allow_outside=self.synthetic_allow_outside,
            content_index=control == "content_copy",
        )
        keep = screen_images(
            manifest.paths,
            f"synthetic manifest {manifest.csv_path}",
            self.on_bad_image,
            self.channels,
            self.image_size,
            log_conversions=control
            in ("none", "shuffle_labels"),  # the other controls never serve its pixels
        )
        manifest = manifest.subset(keep)
        dataset = synthetic_dataset(
            manifest,
            self.channels,
            self.image_size,
            index_offset=self.num_train_original,
            transform=self.train_transform(),
            control=control,
            content_source=train_eval,
        )
        log.info("%s: appended %d synthetic images from %s", self.name, len(dataset), manifest.csv_path)
        if control != "none":
            log.warning(
                "%s: synthetic_control=%s: the synthetic set is a control (%s), not the manifest's data",
                self.name,
                control,
                CONTROL_DESCRIPTIONS[control],
            )
        return dataset

    # ----------------------------------------------------------------- identity (export)
    def folder_source(self) -> Path | None:
        """The `{root}/{name}/{pct}` folder this module reads its splits from, if any (after setup)."""
        return None

    def identity(self) -> dict[str, Any]:
        """What defines the data served (after setup, when sources are resolved): an export records it in
        `export_info.json` and compares it with the next request; subclasses add their parameters."""
        return {
            "dataset": type(self).__name__,
            "name": self.name,
            "pct": self.pct,
            "num_classes": self.num_classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "on_bad_image": self.on_bad_image,
        }

    def _log_split(self, split: str, dataset: Dataset) -> None:
        log.info("%s %s %s: %s", self.name, self.pct, split, conflict_summary(dataset.labels, dataset.biases))

    # ----------------------------------------------------------------- loaders
    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: the {split} split is not built; call setup() first")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The training split without augmentation, in index order (top-K scoring, injection)."""
        return self._loader(self.train_eval_dataset, "train (predict)", shuffle=False)
