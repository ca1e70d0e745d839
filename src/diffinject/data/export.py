"""Write any built data module in the DisEnt folder layout (inspectable, portable, readable back).

`{out}/{name}/{pct}/{align,conflict}/{label}/{index}_{label}_{bias}.png` (train, without augmentation or
synthetic images), `{out}/{name}/{pct}/valid/{label}/…`, `{out}/{name}/test/{label}/…`. The file's leading
`index` is the item index, so the folder source reads an export back in the same order. Images are written
as the data module serves them (resized to its `image_size`), losslessly as PNG.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from diffinject.data.base import BiasedDataModule
from diffinject.data.layout import atomic_directory, image_filename, write_split

log = logging.getLogger("diffinject.data")


def _uint8_items(dataset: Dataset, num_workers: int, batch_size: int = 64) -> Iterator[tuple]:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in loader:
        images = (batch["image"] * 255).round_().clamp_(0, 255).to(torch.uint8)
        for image, label, bias, index in zip(
            images, batch["label"], batch["bias"], batch["index"], strict=True
        ):
            yield int(index), int(label), int(bias), image


def _expected_names(dataset: Dataset) -> set[str]:
    return {
        f"{label}/{image_filename(i, int(label), int(bias))}"
        for i, (label, bias) in enumerate(zip(dataset.labels, dataset.biases, strict=True))
    }


def _existing_names(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*.png")}


def export_datamodule(
    datamodule: BiasedDataModule, out: str | Path, overwrite: bool = False, num_workers: int = 0
) -> Path:
    """Export train (no augmentation), validation and test of `datamodule`; returns `{out}/{name}`.

    An existing `{out}/{name}/{pct}` is an error unless `overwrite`; an existing `{out}/{name}/test` holding
    exactly the files this export would write is reused (several ratios share one test split).
    """
    dataset_dir = Path(out) / datamodule.name
    pct_dir, test_dir = dataset_dir / datamodule.pct, dataset_dir / "test"
    source_dir = Path(datamodule.root) / datamodule.name / datamodule.pct
    datamodule.setup("fit")
    datamodule.setup("test")
    if source_dir.is_dir() and source_dir.resolve() == pct_dir.resolve():
        log.info("%s is already the folder layout the data module reads; nothing to export", pct_dir)
        return dataset_dir
    if pct_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{pct_dir} already exists; pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(pct_dir)
    if test_dir.exists():
        if overwrite:
            shutil.rmtree(test_dir)
        elif _existing_names(test_dir) != _expected_names(datamodule.test_dataset):
            raise FileExistsError(
                f"{test_dir} exists with other files than this export's test split; "
                f"pass overwrite=True (--overwrite) to replace it"
            )
        else:
            log.info("%s already holds this test split; reusing it", test_dir)
    with atomic_directory(pct_dir) as tmp:
        n_train = write_split(
            tmp, _uint8_items(datamodule.train_eval_dataset, num_workers), by_alignment=True
        )
        n_val = write_split(
            tmp / "valid", _uint8_items(datamodule.val_dataset, num_workers), by_alignment=False
        )
    with atomic_directory(test_dir) as tmp:
        if tmp is not None:
            n_test = write_split(tmp, _uint8_items(datamodule.test_dataset, num_workers), by_alignment=False)
            log.info("exported %d test images to %s", n_test, test_dir)
    log.info("exported %d train and %d validation images to %s", n_train, n_val, pct_dir)
    return dataset_dir
