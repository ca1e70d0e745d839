"""The `content_copy` control (top-K oversampling): each manifest row served as its content training image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffinject.cli import main
from diffinject.data import CMNISTDataModule, FolderDataModule
from diffinject.data.base import BiasedDataModule
from test_cli_classifiers import CONFIGS, tiny, write_manifest
from test_data_folder import make_tree

#: (manifest index, content_index, label), rows deliberately out of index order; labels differ from the
#: contents' own labels, so a label taken from the content image would show
ROWS = [(7, 1234, 3), (2, 5, 9), (4, 3599, 0), (11, 5, 1)]


def _manifest(
    folder: Path, rows: list[tuple[int, int, int]], header: str = "index,content_index,style_index,label,path"
) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = [header]
    for index, content, label in rows:
        Image.fromarray(np.full((28, 28, 3), 200, dtype=np.uint8)).save(folder / "images" / f"{index}.png")
        cells = {"index": index, "content_index": content, "style_index": 0, "label": label}
        cells["path"] = f"images/{index}.png"
        lines.append(",".join(str(cells[c]) for c in header.split(",")))
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def _synthetic(dm: BiasedDataModule) -> list[dict]:
    dm.setup("fit")
    return [dm.train_dataset[i] for i in range(dm.num_train_original, len(dm.train_dataset))]


def _cmnist(manifest: Path, **kwargs) -> CMNISTDataModule:
    return CMNISTDataModule(source="embedded", synthetic_manifest=str(manifest), **kwargs)


def test_rows_serve_the_training_image_at_content_index(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, ROWS)
    dm = _cmnist(manifest, synthetic_control="content_copy")
    copies = _synthetic(dm)
    plain = _synthetic(_cmnist(manifest))
    ordered = sorted(ROWS)  # items follow the manifest's index column
    assert len(copies) == len(plain) == len(ROWS) and len(dm.train_dataset) == 3600 + len(ROWS)
    assert [it["index"] for it in copies] == [it["index"] for it in plain] == [3600, 3601, 3602, 3603]
    assert [it["label"] for it in copies] == [label for _, _, label in ordered]
    assert dm.train_dataset.labels[3600:].tolist() == [label for _, _, label in ordered]
    assert all(it["bias"] == -1 for it in copies) and dm.train_dataset.biases[3600:].tolist() == [-1] * 4
    for item, (_, content, _) in zip(copies, ordered, strict=True):
        original = dm.train_eval_dataset[content]["image"]
        assert item["image"].dtype == torch.float32 and torch.equal(item["image"], original)
    own = dm.train_eval_dataset.labels[[content for _, content, _ in ordered]].tolist()
    assert own != [it["label"] for it in copies]  # the row's label, not the content image's
    assert not torch.equal(copies[0]["image"], plain[0]["image"])  # not the manifest's PNG
    assert torch.equal(copies[0]["image"], copies[3]["image"])  # index 2 and 11 share content 5


def test_copies_pass_through_the_training_transform(tmp_path: Path) -> None:
    dm = _cmnist(_manifest(tmp_path, ROWS), synthetic_control="content_copy")
    dm.train_transform = lambda: lambda image: 255 - image  # a visible, deterministic "augmentation"
    copies = _synthetic(dm)
    for item, (_, content, _) in zip(copies, sorted(ROWS), strict=True):
        original = dm.train_eval_dataset.images[content]
        assert torch.equal(item["image"], (255 - original).float() / 255.0)
    assert torch.equal(dm.train_eval_dataset[5]["image"], dm.train_eval_dataset.images[5].float() / 255.0)


def test_a_manifest_without_content_index_is_refused(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, ROWS, header="index,style_index,label,path")
    assert len(_synthetic(_cmnist(manifest))) == 4  # fine without the control
    with pytest.raises(ValueError, match=r"lacks column\(s\) content_index.*content_copy") as error:
        _cmnist(manifest, synthetic_control="content_copy").setup("fit")
    assert str(manifest) in str(error.value)


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([(0, 3600, 1)], r"1 row\(s\) name a content_index outside the training split of 3600 images"),
        ([(0, -2, 1)], r"line 2: content_index -2 is negative"),
    ],
)
def test_content_index_outside_the_split_is_refused(tmp_path: Path, rows: list, pattern: str) -> None:
    manifest = _manifest(tmp_path, rows)
    with pytest.raises(ValueError, match=pattern) as error:
        _cmnist(manifest, synthetic_control="content_copy").setup("fit")
    assert str(manifest) in str(error.value)


def test_skipped_rows_keep_their_content(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path, ROWS)
    (tmp_path / "images" / "4.png").write_bytes(b"\x89PNG broken")  # row index 4 (content 3599) dropped
    dm = _cmnist(manifest, synthetic_control="content_copy", on_bad_image="skip")
    copies = _synthetic(dm)
    kept = [row for row in sorted(ROWS) if row[0] != 4]
    assert [it["label"] for it in copies] == [label for _, _, label in kept]
    for item, (_, content, _) in zip(copies, kept, strict=True):
        assert torch.equal(item["image"], dm.train_eval_dataset[content]["image"])


def test_folder_module_serves_its_files(tmp_path: Path) -> None:
    make_tree(tmp_path / "data", num_classes=5)
    manifest = _manifest(tmp_path / "inject", [(0, 3, 1), (1, 14, 4), (2, 0, 2)])
    dm = FolderDataModule(
        str(tmp_path / "data"), name="toy_set", pct="1pct", num_classes=5, image_size=16, augment=False,
        synthetic_manifest=str(manifest), synthetic_control="content_copy",
    )  # fmt: skip
    copies = _synthetic(dm)
    assert len(dm.train_eval_dataset) == 15 and [it["index"] for it in copies] == [15, 16, 17]
    assert [it["label"] for it in copies] == [1, 4, 2]
    for item, content in zip(copies, (3, 14, 0), strict=True):
        assert item["image"].shape == (3, 16, 16)
        assert torch.equal(item["image"], dm.train_eval_dataset[content]["image"])


def test_content_copy_from_the_cli(tmp_path: Path) -> None:
    """The study variant sets `data.init_args.synthetic_control: content_copy` on the CMNIST debias config
    (checkpoint selection on val/acc here: the bias-model rule needs a trained bias stage)."""
    manifest = write_manifest(tmp_path / "inject")  # row i: content_index i, label i % 10
    config = yaml.safe_load((CONFIGS / "cmnist" / "debias.yaml").read_text())
    config["model"]["init_args"].pop("selection_bias", None)
    (tmp_path / "debias.yaml").write_text(yaml.safe_dump(config))
    cli = main(
        [
            "fit", "--config", str(tmp_path / "debias.yaml"), *tiny(tmp_path / "run", tmp_path / "d"),
            "--data.init_args.synthetic_manifest", str(manifest),
            "--data.init_args.synthetic_control", "content_copy", "--trainer.fast_dev_run", "true",
        ]
    )  # fmt: skip
    dm = cli.datamodule
    assert dm.synthetic_control == "content_copy" and len(dm.train_dataset) == 3620
    for r in (0, 7, 19):
        item = dm.train_dataset[3600 + r]
        assert item["label"] == r % 10 and item["index"] == 3600 + r
        assert torch.equal(item["image"], dm.train_eval_dataset[r]["image"])
