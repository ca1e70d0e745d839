"""Synthetic manifest: appended to the training split only, and every malformed manifest is a clear error."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.data import (
    BFFHQDataModule,
    CCIFAR10DataModule,
    CMNISTDataModule,
    DogsCatsDataModule,
    FolderDataModule,
)
from diffinject.data.base import BiasedDataModule
from diffinject.data.datasets import BadImageError
from test_data_folder import make_tree

HEADER = "index,content_index,style_index,label,path\n"


def _write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    rng = np.random.default_rng(0)
    for i in range(count):
        name = f"syn_{i:03d}.png"
        if i == 1:  # grayscale and larger: must come out RGB 28×28
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), mode="L").save(folder / name)
        else:
            Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(folder / name)
        names.append(f"images/{name}")
    return names


def _manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    return path


def _dm(manifest: Path, **kwargs) -> CMNISTDataModule:
    return CMNISTDataModule(source="embedded", synthetic_manifest=str(manifest), **kwargs)


def test_synthetic_rows_are_appended_to_train_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = _write_images(tmp_path / "images", 3)
    # rows out of order: items follow the manifest's index column
    manifest = _manifest(
        tmp_path, HEADER + f"7,1,2,3,{names[2]}\n2,5,6,9,{names[0]}\n4,8,9,0,{tmp_path / names[1]}\n"
    )
    dm = _dm(manifest)
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm.setup("fit")
    assert dm.num_train_original == 3600 and len(dm.train_eval_dataset) == 3600
    assert len(dm.train_dataset) == 3603 and len(dm.val_dataset) == 400
    items = [dm.train_dataset[3600 + r] for r in range(3)]
    assert [it["index"] for it in items] == [3600, 3601, 3602]
    assert [it["label"] for it in items] == [9, 0, 3]
    assert all(it["bias"] == -1 for it in items)
    assert all(it["image"].shape == (3, 28, 28) and it["image"].dtype == torch.float32 for it in items)
    gray = items[1]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert dm.train_dataset.biases[-3:].tolist() == [-1, -1, -1]
    assert "appended 3 synthetic images" in caplog.text and "3 with unknown bias" in caplog.text
    indices = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert sorted(indices.tolist()) == list(range(3603))


H = "index,label,path\n"
MALFORMED = [
    (
        "index,path\n0,images/syn_000.png\n",
        ValueError,
        r"lacks column\(s\) label; found header \['index', 'path'\]",
    ),
    (
        H + "0,seven,images/syn_000.png\n",
        ValueError,
        r"line 2: column 'label' must be an integer, got 'seven'",
    ),
    (H + "x,1,images/syn_000.png\n", ValueError, r"line 2: column 'index' must be an integer"),
    (H + "0,10,images/syn_000.png\n", ValueError, r"line 2: label 10 is outside \[0, 10\)"),
    (H + "0,-1,images/syn_000.png\n", ValueError, r"label -1 is outside"),
    (
        H + "0,1,images/syn_000.png\n0,2,images/syn_001.png\n",
        ValueError,
        r"line 3: duplicate index 0 \(first on line 2",
    ),
    (H + "0,1,images/missing.png\n", FileNotFoundError, r"line 2: image .*images/missing.png does not exist"),
    (H + "0,1\n", ValueError, r"line 2: row has fewer fields"),
    (H, ValueError, r"has a header but no rows"),
]


@pytest.mark.parametrize(("text", "error", "pattern"), MALFORMED)
def test_malformed_manifest(tmp_path: Path, text: str, error: type, pattern: str) -> None:
    _write_images(tmp_path / "images", 2)
    manifest = _manifest(tmp_path, text)
    with pytest.raises(error, match=pattern) as err:
        _dm(manifest).setup("fit")
    assert str(manifest) in str(err.value)


def test_missing_manifest_file(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"synthetic manifest .*nope.csv does not exist; expected a CSV"
    ):
        _dm(tmp_path / "nope.csv").setup("fit")


def test_corrupt_synthetic_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = _write_images(tmp_path / "images", 2)
    (tmp_path / names[1]).write_bytes(b"\x89PNG broken")
    manifest = _manifest(tmp_path, HEADER + f"0,0,0,1,{names[0]}\n1,0,0,2,{names[1]}\n")
    with pytest.raises(BadImageError, match=r"synthetic manifest .*\n.*syn_001\.png"):
        _dm(manifest).setup("fit")  # an unreadable header fails at setup, naming the file
    lenient = _dm(manifest, on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="diffinject.data"):
        lenient.setup("fit")
    assert len(lenient.train_dataset) == 3601
    assert "dropped 1 unreadable image(s) from synthetic manifest" in caplog.text


def _control_manifest(tmp_path: Path, n: int = 12) -> Path:
    names = _write_images(tmp_path / "images", n)
    rows = "".join(f"{10 + 3 * i},0,0,{i % 10},{names[i]}\n" for i in range(n))
    return _manifest(tmp_path, HEADER + rows)


def _synthetic_items(dm: BiasedDataModule) -> list[dict]:
    dm.setup("fit")
    return [dm.train_dataset[i] for i in range(dm.num_train_original, len(dm.train_dataset))]


def test_uniform_colour_control_replaces_images_keeps_labels(tmp_path: Path) -> None:
    manifest = _control_manifest(tmp_path)
    plain = _synthetic_items(_dm(manifest))
    control = _synthetic_items(_dm(manifest, synthetic_control="uniform_colour"))
    again = _synthetic_items(_dm(manifest, synthetic_control="uniform_colour"))
    assert [it["label"] for it in control] == [it["label"] for it in plain]
    assert [it["index"] for it in control] == [it["index"] for it in plain]
    colours = []
    for item, reference, repeat in zip(control, plain, again, strict=True):
        image = item["image"]
        assert image.shape == reference["image"].shape == (3, 28, 28) and image.dtype == torch.float32
        colour = image[:, :1, :1]
        assert torch.equal(image, colour.expand_as(image))  # one colour per image
        assert torch.equal(image, repeat["image"])  # deterministic across builds
        colours.append(colour.flatten())
    colours = torch.stack(colours)
    assert len(torch.unique(colours, dim=0)) == len(colours)  # a different colour per row
    assert float(colours.min()) >= 0.0 and float(colours.max()) <= 1.0
    assert float(colours.std()) > 0.15  # spread over [0, 1], not a constant
    assert not any(torch.equal(c["image"], p["image"]) for c, p in zip(control, plain, strict=True))


def test_shuffle_labels_control_permutes_labels_keeps_images(tmp_path: Path) -> None:
    manifest = _control_manifest(tmp_path)
    plain = _synthetic_items(_dm(manifest))
    control = _synthetic_items(_dm(manifest, synthetic_control="shuffle_labels"))
    again = _synthetic_items(_dm(manifest, synthetic_control="shuffle_labels"))
    labels = [it["label"] for it in plain]
    shuffled = [it["label"] for it in control]
    assert sorted(shuffled) == sorted(labels) and shuffled != labels
    assert shuffled == [it["label"] for it in again]
    for item, reference in zip(control, plain, strict=True):
        assert torch.equal(item["image"], reference["image"]) and item["index"] == reference["index"]
        assert item["bias"] == -1


def test_synthetic_control_does_not_touch_the_real_images(tmp_path: Path) -> None:
    dm = _dm(_control_manifest(tmp_path, 3), synthetic_control="uniform_colour")
    dm.setup("fit")
    assert torch.equal(dm.train_dataset[5]["image"], dm.train_eval_dataset[5]["image"])
    assert dm.train_dataset.labels[:3600].tolist() == dm.train_eval_dataset.labels.tolist()


def test_invalid_synthetic_control_is_a_clear_error(tmp_path: Path) -> None:
    expected = (
        r"synthetic_control must be one of none, uniform_colour, shuffle_labels, content_copy, got 'noise'"
    )
    with pytest.raises(ValueError, match=expected):
        _dm(tmp_path / "manifest.csv", synthetic_control="noise")


def test_folder_module_applies_the_control(tmp_path: Path) -> None:
    """A folder dataset (16 px, resized synthetic images, no augmentation) gets the same controls."""
    make_tree(tmp_path / "data", num_classes=5)
    manifest = _control_manifest(tmp_path / "inject", 4)
    args = {"name": "toy_set", "pct": "1pct", "num_classes": 5, "image_size": 16, "augment": False}
    modules = {
        control: FolderDataModule(
            str(tmp_path / "data"),
            num_workers=0,
            synthetic_manifest=str(manifest),
            synthetic_control=control,
            **args,
        )
        for control in ("none", "uniform_colour", "shuffle_labels")
    }
    items = {control: _synthetic_items(dm) for control, dm in modules.items()}
    assert [it["label"] for it in items["uniform_colour"]] == [0, 1, 2, 3]
    for item in items["uniform_colour"]:
        image = item["image"]
        assert image.shape == (3, 16, 16) and torch.equal(image, image[:, :1, :1].expand_as(image))
    assert sorted(it["label"] for it in items["shuffle_labels"]) == [0, 1, 2, 3]
    assert [it["label"] for it in items["shuffle_labels"]] != [0, 1, 2, 3]
    for shuffled, plain in zip(items["shuffle_labels"], items["none"], strict=True):
        assert torch.equal(shuffled["image"], plain["image"])
    for cls in (BFFHQDataModule, DogsCatsDataModule, CCIFAR10DataModule):
        assert cls(synthetic_control="shuffle_labels").synthetic_control == "shuffle_labels"
        with pytest.raises(ValueError, match="synthetic_control must be one of"):
            cls(synthetic_control="uniform")


def test_uniform_colour_control_on_an_empty_accepted_set() -> None:
    """The gate may accept no image: the colour-field control is then empty too, not a crash (5 % study)."""
    from diffinject.data.synthetic import uniform_colour_images

    assert uniform_colour_images(np.zeros(0, dtype=np.int64), 3, 28).shape == (0, 3, 28, 28)
