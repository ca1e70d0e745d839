"""Corrupted CIFAR-10: each corruption, the numpy image ops, the cached builder and the data module."""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import diffinject.data.ccifar10 as ccifar_module
from diffinject.data import CCIFAR10DataModule
from diffinject.data.ccifar10 import build_ccifar10
from diffinject.data.corruptions import TYPE0, corrupt
from diffinject.data.image_ops import gaussian_filter, hsv_to_rgb, motion_blur, plasma_fractal, rgb_to_hsv


@pytest.fixture(scope="module")
def random_images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def corrupted(random_images: np.ndarray) -> dict[str, np.ndarray]:
    return {name: corrupt(random_images, name, np.random.default_rng(1)) for name in TYPE0}


def test_type0_order() -> None:
    assert TYPE0 == (
        "snow", "frost", "fog", "brightness", "contrast", "spatter", "elastic", "jpeg", "pixelate", "saturate"
    )  # fmt: skip


@pytest.mark.parametrize("name", TYPE0)
def test_corruption_keeps_shape_and_changes_image(
    name: str, random_images: np.ndarray, corrupted: dict[str, np.ndarray]
) -> None:
    out = corrupted[name]
    assert out.shape == random_images.shape and out.dtype == np.uint8
    changed = np.mean(out != random_images)
    assert changed > 0.03, f"{name} changed only {changed:.1%} of the pixels"
    for image_in, image_out in zip(random_images, out, strict=True):
        assert not np.array_equal(image_in, image_out), f"{name} left an image untouched"
    again = corrupt(random_images, name, np.random.default_rng(1))
    assert np.array_equal(out, again), f"{name} is not deterministic for a fixed generator"


def test_distinct_corruptions_differ(corrupted: dict[str, np.ndarray]) -> None:
    for a, b in itertools.combinations(TYPE0, 2):
        assert not np.array_equal(corrupted[a], corrupted[b]), f"{a} and {b} give identical images"


def test_corruptions_have_their_expected_effect(
    random_images: np.ndarray, corrupted: dict[str, np.ndarray]
) -> None:
    x = random_images.astype(np.float32)
    brighter = corrupted["brightness"].astype(np.float32)
    assert brighter.mean() > x.mean() + 15
    assert corrupted["contrast"].astype(np.float32).std() < 0.3 * x.std()
    snowy = corrupted["snow"].astype(np.float32)
    assert snowy.mean() > x.mean() + 20  # white flakes and a whitened image
    hsv_in, hsv_out = rgb_to_hsv(x / 255), rgb_to_hsv(corrupted["saturate"] / 255.0)
    assert hsv_out[..., 1].mean() > hsv_in[..., 1].mean()


def test_corrupt_rejects_bad_input(random_images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown corruption 'blur'"):
        corrupt(random_images, "blur", np.random.default_rng(0))
    with pytest.raises(ValueError, match="severity must be 1..5"):
        corrupt(random_images, "fog", np.random.default_rng(0), severity=6)
    with pytest.raises(ValueError, match="uint8 N×H×W×3"):
        corrupt(random_images.astype(np.float32), "fog", np.random.default_rng(0))


def test_image_ops() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.uniform(0, 1, size=(4, 8, 8, 3)).astype(np.float32)
    assert np.allclose(hsv_to_rgb(rgb_to_hsv(rgb)), rgb, atol=1e-5)
    flat = np.full((2, 9, 9), 0.4, dtype=np.float32)
    assert np.allclose(gaussian_filter(flat, 1.3), 0.4, atol=1e-6)
    assert np.allclose(motion_blur(flat, 5, 2, np.array([-90.0, -120.0])), 0.4, atol=1e-6)
    spike = np.zeros((1, 9, 9), dtype=np.float32)
    spike[0, 4, 4] = 1
    blurred = gaussian_filter(spike, 1.0)
    assert blurred.sum() == pytest.approx(1.0, abs=1e-5) and blurred[0, 4, 4] < 0.2
    plasma = plasma_fractal(3, 32, 1.75, rng)
    assert plasma.shape == (3, 32, 32) and plasma.min() == 0 and plasma.max() == 1
    with pytest.raises(ValueError, match="power of two"):
        plasma_fractal(1, 24, 2, rng)


def _fake_cifar(per_class_train: int = 20, per_class_test: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    train_y = np.repeat(np.arange(10), per_class_train)
    test_y = np.repeat(np.arange(10), per_class_test)
    train_x = rng.integers(0, 256, size=(len(train_y), 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(len(test_y), 32, 32, 3), dtype=np.uint8)
    return train_x, train_y, test_x, test_y


@pytest.fixture(scope="module")
def built_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ccifar")
    build_ccifar10(*_fake_cifar(), root, ratio=0.05, seed=0)
    return root


def test_build_writes_folder_layout(built_root: Path) -> None:
    dataset = built_root / "cifar10c"
    assert sorted(p.name for p in dataset.iterdir()) == ["5pct", "test", "test_build.json"]
    assert sorted(p.name for p in (dataset / "5pct").iterdir()) == [
        "align",
        "build.json",
        "conflict",
        "valid",
    ]
    assert json.loads((dataset / "5pct" / "build.json").read_text())["severity"] == 5
    assert len(list((dataset / "5pct").rglob("*.png"))) == 200
    assert len(list((dataset / "test").rglob("*.png"))) == 100
    assert not list(built_root.rglob(".*tmp*")), "temporary build folders left behind"


def test_module_reads_the_build(built_root: Path) -> None:
    dm = CCIFAR10DataModule(root=str(built_root), ratio=0.05, source="folder", num_workers=0, batch_size=8)
    assert (dm.name, dm.pct, dm.image_size, dm.num_classes) == ("cifar10c", "5pct", 32, 10)
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (180, 20, 100)
    train = dm.train_eval_dataset
    assert np.sum(train.labels != train.biases) == 10  # one conflicting per class (18 × 5% rounds to 1)
    test = dm.test_dataset
    assert np.mean(test.labels == test.biases) == pytest.approx(0.1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert [train[i]["index"] for i in range(3)] == [0, 1, 2]


def test_rebuild_reuses_cache(built_root: Path) -> None:
    marker = built_root / "cifar10c" / "5pct" / "build.json"
    before = marker.stat().st_mtime_ns
    build_ccifar10(*_fake_cifar(), built_root, ratio=0.05, seed=0)
    assert marker.stat().st_mtime_ns == before


def test_cache_built_with_other_parameters_is_refused(built_root: Path) -> None:
    dm = CCIFAR10DataModule(root=str(built_root), ratio=0.05, seed=1, source="folder", num_workers=0)
    with pytest.raises(ValueError, match=r"built with other parameters \(seed: cached 0 vs requested 1\)"):
        dm.setup("fit")


def test_auto_without_cache_or_cifar_is_a_clear_error(tmp_path: Path) -> None:
    dm = CCIFAR10DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"no Corrupted CIFAR-10 at .*1pct.*cifar-10-batches-py"):
        dm.setup("fit")


def test_torchvision_source_builds_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = []

    def fake_loader(root, download=False):
        calls.append(root)
        return _fake_cifar(per_class_train=10, per_class_test=10)

    monkeypatch.setattr(ccifar_module, "load_cifar10_arrays", fake_loader)
    dm = CCIFAR10DataModule(
        root=str(tmp_path), ratio="5pct", source="torchvision", num_workers=0, augment=False
    )
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm.prepare_data()
        dm.setup("fit")
    assert dm.resolved_source == "torchvision" and len(calls) == 1
    assert len(dm.train_dataset) == 90
    again = CCIFAR10DataModule(root=str(tmp_path), ratio=0.05, source="auto", num_workers=0)
    again.setup("fit")
    assert again.resolved_source == "folder" and len(calls) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="severity"):
        CCIFAR10DataModule(severity=0)
    with pytest.raises(ValueError, match="ratio"):
        CCIFAR10DataModule(ratio=1.0)
    with pytest.raises(ValueError, match="source"):
        CCIFAR10DataModule(source="embedded")
