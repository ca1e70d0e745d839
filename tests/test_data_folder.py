"""Folder datasets (DisEnt layout): parsing, presets, and every bad-input case with its message."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.data import BFFHQDataModule, DogsCatsDataModule, FolderDataModule
from diffinject.data.datasets import BadImageError
from diffinject.data.layout import parse_label_bias


def _png(path: Path, size: int = 8, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_tree(
    root: Path,
    name: str = "toy_set",
    pct: str = "1pct",
    num_classes: int = 2,
    per_class: int = 3,
    valid_at_dataset_level: bool = False,
    nested_eval: bool = True,
    size: int = 8,
) -> Path:
    """Write {root}/{name}/{pct}/{align,conflict}/{c}/…, valid and test (2 per class); return the dataset."""
    dataset = root / name
    idx = 0
    for c in range(num_classes):
        for k in range(per_class):
            conflict = k == 0
            bias = (c + 1) % num_classes if conflict else c
            _png(
                dataset / pct / ("conflict" if conflict else "align") / str(c) / f"{idx}_{c}_{bias}.png",
                size,
                idx,
            )
            idx += 1
    valid = dataset / "valid" if valid_at_dataset_level else dataset / pct / "valid"
    for split_dir in (valid, dataset / "test"):
        for c in range(num_classes):
            for k in range(2):
                sub = split_dir / str(c) if nested_eval else split_dir
                _png(sub / f"{idx}_{c}_{(c + k) % num_classes}.png", size, idx)
                idx += 1
    return dataset


def _dm(root: Path, **kwargs) -> FolderDataModule:
    args = {
        "name": "toy_set",
        "pct": "1pct",
        "image_size": 16,
        "num_classes": 2,
        "num_workers": 0,
        "batch_size": 4,
    }
    args.update(kwargs)
    return FolderDataModule(str(root), **args)


def test_parse_label_bias_uses_last_two_fields() -> None:
    assert parse_label_bias("12_3_7") == (3, 7)
    assert parse_label_bias("img_a_b_1_0") == (1, 0)
    assert parse_label_bias("12_3_x") is None
    assert parse_label_bias("nounderscore") is None


def test_reads_tree_with_items_labels_and_order(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dm = _dm(tmp_path, augment=False)
    dm.setup("fit")
    dm.setup("test")
    train = dm.train_eval_dataset
    assert len(train) == 6 and len(dm.val_dataset) == 4 and len(dm.test_dataset) == 4
    # ordered by the leading index across align/ and conflict/
    assert [Path(p).name for p in train.paths] == [
        "0_0_1.png", "1_0_0.png", "2_0_0.png", "3_1_0.png", "4_1_1.png", "5_1_1.png"
    ]  # fmt: skip
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert train.biases.tolist() == [1, 0, 0, 0, 1, 1]
    item = train[3]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32  # resized 8 -> 16
    assert (item["label"], item["bias"], item["index"]) == (1, 0, 3)
    # decoded once (issue 20 §3): a small split is one uint8 tensor, in the file order above
    assert isinstance(train.pixels, torch.Tensor) and train.pixels.dtype == torch.uint8
    assert train.pixels.shape == (6, 3, 16, 16)


def test_valid_at_dataset_level_and_flat_eval_folders(tmp_path: Path) -> None:
    make_tree(tmp_path, valid_at_dataset_level=True, nested_eval=False)
    dm = _dm(tmp_path)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.val_dataset) == 4 and len(dm.test_dataset) == 4
    assert sorted(dm.test_dataset.labels.tolist()) == [0, 0, 1, 1]


def test_loader_decodes_in_worker_processes(tmp_path: Path) -> None:
    make_tree(tmp_path)
    dm = _dm(tmp_path, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == 6
    assert batches[0]["image"].shape[1:] == (3, 16, 16)


def test_missing_root_names_path_and_layout(tmp_path: Path) -> None:
    dm = _dm(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "toy_set") in message
    assert "expected layout" in message and "align/{class}/{idx}_{label}_{bias}.png" in message


def test_unparseable_names_listed_up_to_five(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    for i in range(7):
        _png(dataset / "1pct" / "align" / "0" / f"bad{i}.png")
    with pytest.raises(ValueError) as err:
        _dm(tmp_path).setup("fit")
    message = str(err.value)
    assert "7 file name(s)" in message and "{idx}_{label}_{bias}.png" in message
    assert message.count("bad") == 5 and "and 2 more" in message


def test_corrupt_image_errors_with_path(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    broken = dataset / "1pct" / "align" / "1" / "4_1_1.png"
    broken.write_bytes(broken.read_bytes()[:-30])  # truncated PNG: the header reads, the pixels do not
    dm = _dm(tmp_path, augment=False)
    dm.setup("fit")
    with pytest.raises(BadImageError, match="4_1_1.png.*on_bad_image='skip'"):
        dm.train_eval_dataset[4]
    with pytest.raises(BadImageError, match="4_1_1.png"):
        list(dm.train_dataloader())


def test_unidentifiable_image_fails_setup_naming_it(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    (dataset / "1pct" / "align" / "1" / "4_1_1.png").write_bytes(b"not an image at all")
    with pytest.raises(BadImageError, match=r"1 image\(s\) in training split .*\n.*4_1_1\.png: cannot ident"):
        _dm(tmp_path).setup("fit")


def test_corrupt_image_skipped_and_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = make_tree(tmp_path)
    (dataset / "1pct" / "align" / "1" / "4_1_1.png").write_bytes(b"not an image at all")
    dm = _dm(tmp_path, on_bad_image="skip")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm.setup("fit")
    assert len(dm.train_dataset) == 5
    assert "dropped 1 unreadable image(s)" in caplog.text and "4_1_1.png" in caplog.text
    assert [item["index"] for item in dm.train_eval_dataset] == list(range(5))


def test_unknown_pct_lists_available(tmp_path: Path) -> None:
    make_tree(tmp_path, pct="1pct")
    make_tree(tmp_path, pct="5pct")
    with pytest.raises(FileNotFoundError, match=r"no '2pct' folder.*available: \['1pct', '5pct'\]"):
        _dm(tmp_path, pct="2pct").setup("fit")


def test_class_missing_from_a_split(tmp_path: Path) -> None:
    make_tree(tmp_path, num_classes=2)
    with pytest.raises(ValueError, match=r"class\(es\) \[2\] have no images"):
        _dm(tmp_path, num_classes=3).setup("fit")


def test_label_outside_num_classes(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    _png(dataset / "1pct" / "align" / "7" / "99_7_7.png")
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 2\).*99_7_7.png"):
        _dm(tmp_path).setup("fit")


def test_no_validation_folder(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    for path in sorted((dataset / "1pct" / "valid").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (dataset / "1pct" / "valid").rmdir()
    with pytest.raises(
        FileNotFoundError, match=r"no validation folder: neither .*1pct/valid nor .*toy_set/valid"
    ):
        _dm(tmp_path).setup("fit")


def test_no_test_folder_only_fails_the_test_stage(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    for path in sorted((dataset / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (dataset / "test").rmdir()
    dm = _dm(tmp_path)
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="no test folder"):
        dm.setup("test")


def test_non_image_files_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dataset = make_tree(tmp_path)
    (dataset / "1pct" / "align" / "0" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="diffinject.data"):
        _dm(tmp_path).setup("fit")
    assert "ignored 1 non-image file(s)" in caplog.text


def test_bffhq_preset_and_augmentation(tmp_path: Path) -> None:
    make_tree(tmp_path, name="bffhq", pct="0.5pct", size=20)
    dm = BFFHQDataModule(root=str(tmp_path), image_size=16, num_workers=0)
    assert (dm.name, dm.pct, dm.num_classes, dm.channels) == ("bffhq", "0.5pct", 2, 3)
    assert dm.unbiased_test_subset == "conflicting"
    assert BFFHQDataModule().image_size == 224
    dm.setup("fit")
    torch.manual_seed(0)
    augmented = [dm.train_dataset[0]["image"] for _ in range(8)]
    plain = dm.train_eval_dataset[0]["image"]
    assert all(a.shape == plain.shape == (3, 16, 16) for a in augmented)
    assert any(not torch.equal(a, plain) for a in augmented)  # crop/flip applies to train only
    assert torch.equal(dm.train_eval_dataset[0]["image"], plain)
    assert torch.equal(dm.val_dataset[0]["image"], dm.val_dataset[0]["image"])


def test_dogs_cats_preset(tmp_path: Path) -> None:
    make_tree(tmp_path, name="dogs_and_cats", pct="5pct")
    dm = DogsCatsDataModule(root=str(tmp_path), pct="5pct", image_size=16, num_workers=0)
    assert (dm.name, dm.num_classes, dm.unbiased_test_subset) == ("dogs_and_cats", 2, "all")
    dm.setup("test")
    assert len(dm.test_dataset) == 4
    with pytest.raises(FileNotFoundError, match=r"available: \['5pct'\]"):
        DogsCatsDataModule(root=str(tmp_path), pct="1pct").setup("fit")


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="on_bad_image"):
        FolderDataModule("data", "x", "1pct", on_bad_image="ignore")
    with pytest.raises(ValueError, match="batch_size"):
        FolderDataModule("data", "x", "1pct", batch_size=0)
