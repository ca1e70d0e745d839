"""Write any built data module in the DisEnt folder layout (inspectable, portable, readable back).

`{out}/{name}/{pct}/{align,conflict}/{label}/{index}_{label}_{bias}.png` (train, without augmentation or
synthetic images), `{out}/{name}/{pct}/valid/{label}/…`, `{out}/{name}/test/{label}/…`. The file's leading
`index` is the item index, so the folder source reads an export back in the same order. Images are written
as the data module serves them (resized to its `image_size`), losslessly as PNG.

Each exported folder carries an `export_info.json` (the data module's `identity()`: dataset, parameters,
source). An existing export is reused when it records exactly what is asked, and is an error naming the
differences otherwise, unless `overwrite`; several ratios share one test split the same way. A rebuild
happens beside the old folders, which are swapped out only once the new ones are complete: a failing or
killed export never costs the export that was there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from diffinject.data.base import BiasedDataModule
from diffinject.data.layout import image_filename, write_split
from diffinject.data.tempdirs import clean_stale_temps, replacing_directory

log = logging.getLogger("diffinject.data")

INFO_FILE = "export_info.json"
#: identity keys the shared test split does not depend on
PER_RATIO_KEYS = ("pct", "ratio", "val_fraction")


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


def read_export_info(folder: Path) -> dict[str, Any] | None:
    """The identity recorded in `folder/export_info.json`; None when absent or unreadable (then unknown)."""
    try:
        info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def differences(found: dict[str, Any], asked: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """ "key: there, asked" for every asked key whose recorded value differs."""
    return [
        f"{key}: {found.get(key)} there, {asked[key]} asked"
        for key in sorted(asked)
        if key not in ignore and found.get(key) != asked[key]
    ]


def _needs_build(
    folder: Path, asked: dict[str, Any], overwrite: bool, legacy_same: Callable[[], bool] | None = None
) -> bool:
    """Whether `folder` must be (re)built; an existing export of something else is an error unless overwrite.

    `legacy_same` judges a folder without `export_info.json` (older exports): True reuses it.
    """
    if not folder.exists() or overwrite:
        return True
    found = read_export_info(folder)
    if found is None:
        if legacy_same is not None and legacy_same():
            log.info("%s already holds this split; reusing it", folder)
            return False
        raise FileExistsError(
            f"{folder} already exists and has no {INFO_FILE} to tell what it holds; pass overwrite=True "
            f"(--overwrite) to replace it, or export to another --out"
        )
    diff = differences(found, asked)
    if diff:
        raise FileExistsError(
            f"{folder} holds an export made with other settings ({'; '.join(diff)}); pass overwrite=True "
            f"(--overwrite) to replace it, or export to another --out"
        )
    log.info("%s already holds this export (%s matches); reusing it", folder, INFO_FILE)
    return False


def _write_info(folder: Path, identity: dict[str, Any]) -> None:
    (folder / INFO_FILE).write_text(json.dumps(identity, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def export_datamodule(
    datamodule: BiasedDataModule, out: str | Path, overwrite: bool = False, num_workers: int = 0
) -> Path:
    """Export train (no augmentation), validation and test of `datamodule`; returns `{out}/{name}`.

    See the module docstring for reuse, refusal and replacement. When the data module reads `{out}/{name}/
    {pct}` itself there is nothing to write; that folder must then not record other settings than asked.
    """
    dataset_dir = Path(out) / datamodule.name
    pct_dir, test_dir = dataset_dir / datamodule.pct, dataset_dir / "test"
    for folder in (pct_dir, test_dir):
        clean_stale_temps(folder)
    datamodule.setup("fit")
    datamodule.setup("test")
    asked = datamodule.identity()
    test_asked = {k: v for k, v in asked.items() if k not in PER_RATIO_KEYS}
    source = datamodule.folder_source()
    if source is not None and pct_dir.is_dir() and source.resolve() == pct_dir.resolve():
        found = read_export_info(pct_dir)
        diff = differences(found, asked, ignore=("source",)) if found is not None else []
        if diff:
            raise FileExistsError(
                f"{pct_dir} holds an export made with other settings ({'; '.join(diff)}), and the data "
                f"module reads that very folder, so it cannot be rebuilt from itself: export to another "
                f"--out, or choose a source that builds the data (e.g. --source embedded) with --overwrite"
            )
        log.info("%s is already the folder layout the data module reads; nothing to export", pct_dir)
        return dataset_dir
    build_pct = _needs_build(pct_dir, asked, overwrite)
    build_test = _needs_build(
        test_dir,
        test_asked,
        overwrite,
        lambda: _existing_names(test_dir) == _expected_names(datamodule.test_dataset),
    )
    with ExitStack() as stack:  # both are built aside, then swapped in (test first, on leaving)
        pct_tmp = stack.enter_context(replacing_directory(pct_dir)) if build_pct else None
        test_tmp = stack.enter_context(replacing_directory(test_dir)) if build_test else None
        if pct_tmp is not None:
            n_train = write_split(
                pct_tmp, _uint8_items(datamodule.train_eval_dataset, num_workers), by_alignment=True
            )
            n_val = write_split(
                pct_tmp / "valid", _uint8_items(datamodule.val_dataset, num_workers), by_alignment=False
            )
            _write_info(pct_tmp, asked)
            log.info("exported %d train and %d validation images to %s", n_train, n_val, pct_dir)
        if test_tmp is not None:
            n_test = write_split(
                test_tmp, _uint8_items(datamodule.test_dataset, num_workers), by_alignment=False
            )
            _write_info(test_tmp, test_asked)
            log.info("exported %d test images to %s", n_test, test_dir)
    return dataset_dir
