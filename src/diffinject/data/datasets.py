"""Map-style datasets returning `{"image", "label", "bias", "index"}` dicts.

`TensorImageDataset` serves small datasets that live in memory as uint8 tensors (CMNIST);
`ImageFileDataset` stores paths only and decodes in DataLoader workers (folder datasets, synthetic images).
Both expose `labels` and `biases` arrays so split statistics never need to decode an image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]


class BadImageError(RuntimeError):
    """An image file that PIL cannot open or decode."""


def pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def load_image(path: str | Path, channels: int, image_size: int | None) -> torch.Tensor:
    """Decode a file to a uint8 C×H×W tensor, converted to `channels` and resized to a square `image_size`.

    Raises BadImageError naming the path when the file is unreadable or corrupt.
    """
    try:
        with Image.open(path) as img:
            img = img.convert(pil_mode(channels))
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises all three for broken files
        raise BadImageError(
            f"cannot decode image {path}: {exc}. Fix or remove the file, or set on_bad_image='skip' "
            f"to drop unreadable files at setup (they are counted in the log)."
        ) from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def image_is_readable(path: str | Path) -> bool:
    """Cheap integrity check (header + chunk checksums, no full decode) used by `on_bad_image='skip'`."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception:  # noqa: BLE001 - any failure means "unreadable"; the caller logs the path
        return False
    return True


def _item(image_u8: torch.Tensor, label: int, bias: int, index: int, transform: Transform | None) -> dict:
    if transform is not None:
        image_u8 = transform(image_u8)
    return {
        "image": image_u8.to(torch.float32).div_(255.0),
        "label": int(label),
        "bias": int(bias),
        "index": int(index),
    }


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N×C×H×W); `index` = position + `index_offset`."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: np.ndarray,
        biases: np.ndarray,
        transform: Transform | None = None,
        index_offset: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be a uint8 N×C×H×W tensor, got {images.dtype} {tuple(images.shape)}"
            )
        if not len(images) == len(labels) == len(biases):
            raise ValueError(
                f"length mismatch: {len(images)} images, {len(labels)} labels, {len(biases)} biases"
            )
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.biases = np.asarray(biases, dtype=np.int64)
        self.transform = transform
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return _item(self.images[i], self.labels[i], self.biases[i], i + self.index_offset, self.transform)

    def with_transform(self, transform: Transform | None) -> TensorImageDataset:
        """Same pixels (shared, not copied) under another transform."""
        return TensorImageDataset(self.images, self.labels, self.biases, transform, self.index_offset)


class ImageFileDataset(Dataset):
    """Images on disk, decoded lazily (in DataLoader workers); `index` = position + `index_offset`."""

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray,
        biases: np.ndarray,
        channels: int,
        image_size: int | None,
        transform: Transform | None = None,
        index_offset: int = 0,
    ) -> None:
        if not len(paths) == len(labels) == len(biases):
            raise ValueError(
                f"length mismatch: {len(paths)} paths, {len(labels)} labels, {len(biases)} biases"
            )
        pil_mode(channels)  # validate early
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.biases = np.asarray(biases, dtype=np.int64)
        self.channels = channels
        self.image_size = image_size
        self.transform = transform
        self.index_offset = index_offset

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        image = load_image(self.paths[i], self.channels, self.image_size)
        return _item(image, self.labels[i], self.biases[i], i + self.index_offset, self.transform)

    def with_transform(self, transform: Transform | None) -> ImageFileDataset:
        return ImageFileDataset(
            self.paths, self.labels, self.biases, self.channels, self.image_size, transform, self.index_offset
        )


class LabeledConcatDataset(ConcatDataset):
    """ConcatDataset that keeps `labels`/`biases` (items keep the `index` their part gives them)."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        super().__init__(datasets)
        self.labels = np.concatenate([d.labels for d in datasets])
        self.biases = np.concatenate([d.biases for d in datasets])
