"""Export to the folder layout and read back: identical items; the `python -m diffinject.data` CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.data import CMNISTDataModule, FolderDataModule
from diffinject.data.__main__ import main
from diffinject.data.export import export_datamodule


def _stack(dataset) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    items = [dataset[i] for i in range(len(dataset))]
    return (
        torch.stack([it["image"] for it in items]),
        [it["label"] for it in items],
        [it["bias"] for it in items],
        [it["index"] for it in items],
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CMNISTDataModule]:
    out = tmp_path_factory.mktemp("export")
    original = CMNISTDataModule(source="embedded", ratio=0.01)
    export_datamodule(original, out)
    return out, original


def test_round_trip_gives_identical_items(exported, caplog: pytest.LogCaptureFixture) -> None:
    out, original = exported
    back = CMNISTDataModule(root=str(out), ratio=0.01, source="auto")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        back.setup("fit")
        back.setup("test")
    assert back.resolved_source == "folder" and "resolved to 'folder'" in caplog.text
    for split in ("train_eval_dataset", "val_dataset", "test_dataset"):
        a, b = _stack(getattr(original, split)), _stack(getattr(back, split))
        assert torch.equal(a[0], b[0]), f"{split}: images differ after the round trip"
        assert a[1:] == b[1:], f"{split}: labels, biases or indices differ after the round trip"


def test_layout_written(exported) -> None:
    out, _ = exported
    dataset = out / "cmnist"
    assert len(list((dataset / "1pct" / "conflict").rglob("*.png"))) == 40
    assert len(list((dataset / "1pct" / "align").rglob("*.png"))) == 3560
    assert len(list((dataset / "1pct" / "valid").rglob("*.png"))) == 400
    assert len(list((dataset / "test").rglob("*.png"))) == 1000
    sample = next((dataset / "1pct" / "conflict").rglob("*.png"))
    label, bias = (int(f) for f in sample.stem.split("_")[-2:])
    assert sample.parent.name == str(label) and label != bias


def test_existing_output_is_reused_when_it_is_this_export(exported, caplog: pytest.LogCaptureFixture) -> None:
    out, original = exported
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        export_datamodule(original, out)
    assert "already holds this export" in caplog.text
    other = CMNISTDataModule(source="embedded", ratio=0.01, seed=1)
    with pytest.raises(FileExistsError, match=r"1pct holds an export made with other settings \(seed: 0 the"):
        export_datamodule(other, out)
    (out / "cmnist" / "1pct" / "export_info.json").rename(out / "info.json")  # an export of unknown origin
    try:
        with pytest.raises(FileExistsError, match=r"1pct already exists and has no export_info.json"):
            export_datamodule(original, out)
    finally:
        (out / "info.json").rename(out / "cmnist" / "1pct" / "export_info.json")


def _tiny_tree(root: Path, pcts: tuple[str, ...], test_names: tuple[str, ...] = ("6_0_1", "7_1_1")) -> None:
    tree = {"valid": ["4_0_0", "5_1_1"], "test": list(test_names)}
    for pct in pcts:
        tree.update(
            {
                f"{pct}/align/0": ["0_0_0", "1_0_0"],
                f"{pct}/conflict/1": ["2_1_0"],
                f"{pct}/align/1": ["3_1_1"],
            }
        )
    for split, names in tree.items():
        folder = root / "toy" / split
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(np.full((12, 12, 3), 200, dtype=np.uint8)).save(folder / f"{name}.png")


def _toy(root: Path, pct: str) -> FolderDataModule:
    return FolderDataModule(str(root), "toy", pct, image_size=8, num_classes=2, num_workers=0)


def test_second_ratio_shares_the_test_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _tiny_tree(tmp_path / "src", ("1pct", "5pct"))
    out = tmp_path / "out"
    export_datamodule(_toy(tmp_path / "src", "1pct"), out)
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        export_datamodule(_toy(tmp_path / "src", "5pct"), out)
    assert "test already holds this export" in caplog.text
    assert len(list((out / "toy" / "5pct").rglob("*.png"))) == 6
    _tiny_tree(tmp_path / "other", ("2pct",), test_names=("8_0_0", "9_1_0"))
    with pytest.raises(FileExistsError, match=r"test holds an export made with other settings \(source: "):
        export_datamodule(_toy(tmp_path / "other", "2pct"), out)
    export_datamodule(_toy(tmp_path / "other", "2pct"), out, overwrite=True)
    assert sorted(p.name for p in (out / "toy" / "test").rglob("*.png")) == [
        "0_0_0.png",
        "1_1_0.png",
    ]  # renamed by index


def test_cli_exports_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a tiny folder dataset re-exported at another size
    _tiny_tree(tmp_path / "src", ("1pct",))
    args = ["export", "folder", "--root", str(tmp_path / "src"), "--name", "toy", "--pct", "1pct"]
    assert main([*args, "--image-size", "8", "--num-classes", "2", "--out", str(tmp_path / "out")]) == 0
    back = FolderDataModule(str(tmp_path / "out"), "toy", "1pct", image_size=8, num_classes=2, num_workers=0)
    back.setup("fit")
    assert len(back.train_dataset) == 4 and Image.open(back.train_eval_dataset.paths[0]).size == (8, 8)
    # the same export again is kept; another one is one line on stderr and exit status 1
    assert main([*args, "--image-size", "8", "--num-classes", "2", "--out", str(tmp_path / "out")]) == 0
    assert main([*args, "--image-size", "6", "--num-classes", "2", "--out", str(tmp_path / "out")]) == 1
    assert "error:" in capsys.readouterr().err
    assert main(["export", "cmnist", "--ratio", "2", "--out", str(tmp_path / "x")]) == 1
    assert "ratio must be a fraction" in capsys.readouterr().err
    assert main(["export", "bffhq", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 1
    assert "expected layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "mnist", "--out", "z"])
