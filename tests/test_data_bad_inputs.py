"""Bad inputs outside the image files: a corrupt CIFAR-10, synthetic manifests that point anywhere or repeat
themselves, and exports that would destroy or silently keep an export of something else; temp folders left
by a killed build are cleaned on the next run."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffinject.data import CCIFAR10DataModule, CMNISTDataModule, FolderDataModule
from diffinject.data.__main__ import main
from diffinject.data.ccifar10 import CIFAR_DIR, CIFAR_FILES
from diffinject.data.datasets import BadImageError
from diffinject.data.export import export_datamodule
from diffinject.data.synthetic import read_synthetic_manifest
from diffinject.data.tempdirs import atomic_directory

DEAD_PID = 4_194_305  # above Linux's largest pid_max: never a live process


# --------------------------------------------------------------------------- CIFAR-10
def test_corrupt_cifar10_names_the_file_and_the_fix(tmp_path: Path) -> None:
    batches = tmp_path / CIFAR_DIR
    batches.mkdir()
    for name in (*CIFAR_FILES, "batches.meta"):
        (batches / name).write_bytes(b"not a pickle")
    dm = CCIFAR10DataModule(root=str(tmp_path), source="torchvision", num_workers=0)
    with pytest.raises(ValueError) as err:
        dm.prepare_data()
    message = str(err.value)
    assert str(batches / "data_batch_1") in message and "MD5" in message
    assert f"delete {batches}" in message and "download=True" in message


# --------------------------------------------------------------------------- synthetic manifests
def _images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full((28, 28, 3), 10 * i, dtype=np.uint8)).save(folder / f"syn_{i}.png")


def test_manifest_paths_outside_its_folder_need_an_explicit_option(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _images(run / "images", 1)
    _images(tmp_path / "elsewhere", 1)
    manifest = run / "manifest.csv"
    for outside in ("../elsewhere/syn_0.png", str(tmp_path / "elsewhere" / "syn_0.png")):
        manifest.write_text(f"index,label,path\n0,1,images/syn_0.png\n1,2,{outside}\n")
        with pytest.raises(ValueError, match=r"line 3: .*syn_0\.png is outside the manifest's folder"):
            read_synthetic_manifest(manifest, 10)
        assert len(read_synthetic_manifest(manifest, 10, allow_outside=True).paths) == 2
    with pytest.raises(ValueError, match="synthetic_allow_outside"):
        CMNISTDataModule(source="embedded", synthetic_manifest=str(manifest)).setup("fit")
    dm = CMNISTDataModule(source="embedded", synthetic_manifest=str(manifest), synthetic_allow_outside=True)
    dm.setup("fit")
    assert len(dm.train_dataset) == dm.num_train_original + 2
    # an absolute path that stays inside is fine
    manifest.write_text(f"index,label,path\n0,1,{run / 'images' / 'syn_0.png'}\n")
    assert len(read_synthetic_manifest(manifest, 10).paths) == 1


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ("-1,1,images/syn_0.png\n", r"line 2: index -1 is negative"),
        ("0,1,images/syn_0.png\n1,2,./images/syn_0.png\n", r"line 3: image .*syn_0\.png is also on line 2"),
        ("0,1,images/syn_0.png\n1,2,images/../images/syn_0.png\n", r"line 3: .* also on line 2"),
    ],
)
def test_manifest_negative_index_and_duplicate_paths(tmp_path: Path, rows: str, pattern: str) -> None:
    _images(tmp_path / "images", 1)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("index,label,path\n" + rows)
    with pytest.raises(ValueError, match=pattern):
        read_synthetic_manifest(manifest, 10)


# --------------------------------------------------------------------------- export
def _tree(root: Path, size: int = 12) -> None:
    tree = {
        "1pct/align/0": ["0_0_0", "1_0_0"],
        "1pct/conflict/1": ["2_1_0"],
        "1pct/align/1": ["3_1_1"],
        "valid": ["4_0_0", "5_1_1"],
        "test": ["6_0_1", "7_1_1"],
    }
    rng = np.random.default_rng(0)
    for split, names in tree.items():
        folder = root / "toy" / split
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}.png")


def _toy(root: Path, image_size: int = 8) -> FolderDataModule:
    return FolderDataModule(str(root), "toy", "1pct", image_size=image_size, num_classes=2, num_workers=0)


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_failing_overwrite_keeps_the_old_export(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    out = tmp_path / "out"
    export_datamodule(_toy(tmp_path / "src"), out)
    before = _files(out)
    broken = tmp_path / "src" / "toy" / "1pct" / "align" / "1" / "3_1_1.png"
    broken.write_bytes(broken.read_bytes()[:60])  # valid header, pixels cut off: fails while building
    with pytest.raises(BadImageError, match="3_1_1.png"):
        export_datamodule(_toy(tmp_path / "src", image_size=10), out, overwrite=True)
    assert _files(out) == before
    assert not [p for p in (out / "toy").iterdir() if p.name.startswith(".")]


def test_export_of_something_else_is_refused_unless_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _tree(tmp_path / "src")
    out = tmp_path / "out"
    args = ["export", "folder", "--root", str(tmp_path / "src"), "--name", "toy", "--pct", "1pct"]
    args += ["--num-classes", "2", "--out", str(out)]
    assert main([*args, "--image-size", "8"]) == 0
    info = json.loads((out / "toy" / "1pct" / "export_info.json").read_text())
    assert info["image_size"] == 8 and info["source"] == os.path.abspath(tmp_path / "src" / "toy")
    capsys.readouterr()
    assert main([*args, "--image-size", "8"]) == 0  # the same export again: kept, nothing rebuilt
    assert main([*args, "--image-size", "12"]) == 1
    err = capsys.readouterr().err
    assert "image_size: 8 there, 12 asked" in err and "--overwrite" in err
    assert Image.open(next((out / "toy" / "1pct" / "align").rglob("*.png"))).size == (8, 8)
    assert main([*args, "--image-size", "12", "--overwrite"]) == 0
    assert Image.open(next((out / "toy" / "1pct" / "align").rglob("*.png"))).size == (12, 12)
    assert Image.open(next((out / "toy" / "test").rglob("*.png"))).size == (12, 12)
    # another source under the same name
    _tree(tmp_path / "other")
    other = [*args[:3], str(tmp_path / "other"), *args[4:], "--image-size", "12"]
    assert main(other) == 1 and "source:" in capsys.readouterr().err


def test_cmnist_reexport_with_another_seed_onto_itself_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a small stand-in for the embedded digits keeps this fast
    import diffinject.data.cmnist as cmnist

    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8), np.repeat(np.arange(10), 20)
    monkeypatch.setattr(cmnist, "load_embedded_digits", lambda: (*digits, *digits))
    out = tmp_path / "data"
    assert main(["export", "cmnist", "--source", "embedded", "--out", str(out)]) == 0
    # the folder there now *is* what source=auto reads: a request for seed 1 must not get the seed-0 export
    assert main(["export", "cmnist", "--root", str(out), "--out", str(out), "--seed", "1"]) == 1
    err = capsys.readouterr().err
    assert "seed: 0 there, 1 asked" in err
    assert main(["export", "cmnist", "--root", str(out), "--out", str(out)]) == 0


# --------------------------------------------------------------------------- temp folders
def test_temp_folders_of_a_killed_build_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / f".data.tmp-{DEAD_PID}-0123abcd"
    live = tmp_path / f".data.tmp-{os.getpid()}-0123abcd"
    for folder in (stale, live):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "x.png").write_bytes(b"half")
    with atomic_directory(tmp_path / "data") as tmp:
        (tmp / "done").write_text("yes")
    assert (tmp_path / "data" / "done").is_file()
    assert not stale.exists() and live.exists()  # a build still running is left alone
    shutil.rmtree(live)


def test_export_cleans_temp_folders_left_by_a_killed_export(tmp_path: Path) -> None:
    _tree(tmp_path / "src")
    leftover = tmp_path / "out" / "toy" / f".1pct.tmp-{DEAD_PID}-0123abcd"
    (leftover / "align").mkdir(parents=True)
    export_datamodule(_toy(tmp_path / "src"), tmp_path / "out")
    assert not leftover.exists()
