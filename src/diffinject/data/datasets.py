"""Map-style datasets returning `{"image", "label", "bias", "index"}` dicts.

`TensorImageDataset` serves small datasets that live in memory as uint8 tensors (CMNIST);
`ImageFileDataset` stores paths only and decodes in DataLoader workers (folder datasets, synthetic images).
Both expose `labels` and `biases` arrays so split statistics never need to decode an image.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]


class BadImageError(RuntimeError):
    """An image file that PIL cannot open or decode, or refuses to (decompression-bomb sized)."""


#: modes holding more than 8 bits of grayscale; scaled (65535 → 255), since PIL's convert("L") clips at 255.
#: "I" is how older Pillow versions open 16-bit PNGs, so it is read as 16-bit too.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_PIXELS = re.compile(r"\((\d+) pixels\)")


def pil_mode(channels: int) -> str:
    if channels == 3:
        return "RGB"
    if channels == 1:
        return "L"
    raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")


def _bomb_error(path: str | Path, pixels: int | str) -> BadImageError:
    return BadImageError(
        f"refusing image {path}: {pixels} pixels is above the limit of {Image.MAX_IMAGE_PIXELS} "
        f"(PIL's decompression-bomb guard, PIL.Image.MAX_IMAGE_PIXELS); such a header is most likely broken "
        f"or hostile. Remove the file, set on_bad_image='skip', or raise the limit if the image is genuine."
    )


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """`PIL.Image.open` whose decompression-bomb guard is always an error naming the file.

    PIL raises only above twice its limit and merely warns between 1× and 2×, which would let a huge image
    through with a line on stderr; here anything above `Image.MAX_IMAGE_PIXELS` is refused.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        found = _PIXELS.search(str(error))
        raise _bomb_error(path, found.group(1) if found else "too many") from error
    with image:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and image.width * image.height > limit:
            raise _bomb_error(path, image.width * image.height)
        yield image


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grayscale scaled to 8 bits (v / 257, rounded: 65535 → 255); other modes unchanged."""
    if image.mode not in WIDE_GRAY_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.rint(np.clip(values, 0.0, 65535.0) / 257.0).astype(np.uint8))


def _decode(path: str | Path, channels: int, image_size: int | None) -> np.ndarray:
    with open_image(path) as img:
        img = to_8bit(img).convert(pil_mode(channels))
        if image_size is not None and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def load_image(path: str | Path, channels: int, image_size: int | None) -> torch.Tensor:
    """Decode a file to a uint8 C×H×W tensor, converted to `channels` and resized to a square `image_size`.

    Raises BadImageError naming the path when the file is unreadable, corrupt or decompression-bomb sized.
    """
    try:
        array = _decode(path, channels, image_size)
    except BadImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files; the cause is chained
        raise BadImageError(
            f"cannot decode image {path}: {exc}. Fix or remove the file, or set on_bad_image='skip' "
            f"to drop unreadable files at setup (they are counted in the log)."
        ) from exc
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImageCheck:
    """What setup learns about one file: its PIL mode and size, or why it cannot be used."""

    mode: str | None = None
    size: tuple[int, int] | None = None
    problem: str | None = None


def check_image(path: str | Path, channels: int, decode: bool) -> ImageCheck:
    """Header facts of `path` and, with `decode`, a full decode as the loader does it (no resize).

    `verify()` alone passes files whose header and checksums are intact but whose pixel data is not, so the
    skip policy decodes; JPEGs decode at 1/8 scale (all entropy-coded data is still read, at a fraction of
    the cost). Without `decode` only the header is read (~60 µs a file).
    """
    try:
        with open_image(path) as image:
            mode, size = image.mode, image.size
            if decode:
                if image.format == "JPEG":
                    image.draft(image.mode, (1, 1))
                to_8bit(image).convert(pil_mode(channels))
    except Exception as exc:  # noqa: BLE001 - any failure makes the file unusable; the caller names it
        return ImageCheck(problem=str(exc) or type(exc).__name__)
    return ImageCheck(mode, size)


MODE_KINDS = {
    "1": "1-bit",
    "L": "grayscale",
    "LA": "grayscale+alpha",
    "P": "palette",
    "PA": "palette+alpha",
    "RGB": "RGB",
    "RGBA": "RGBA",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "F": "float",
    **dict.fromkeys(WIDE_GRAY_MODES, "16-bit"),
}


def conversion_summary(checks: Sequence[ImageCheck], channels: int, image_size: int | None) -> str | None:
    """One line counting the images the loader converts or resizes, e.g. "converted 12 RGBA, 3 grayscale
    image(s) to RGB; resized 40 image(s) from 30x30 to 28x28"; None when every image is served as stored."""
    target = pil_mode(channels)
    kinds = Counter(MODE_KINDS.get(c.mode, c.mode) for c in checks if c.mode not in (None, target))
    sizes = Counter(
        f"{c.size[0]}x{c.size[1]}"
        for c in checks
        if c.size is not None and image_size is not None and c.size != (image_size, image_size)
    )
    parts = []
    if kinds:
        counts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
        notes = ["16-bit scaled to 8 bit"] if "16-bit" in kinds else []
        notes += ["alpha dropped"] if any("alpha" in k or k in ("RGBA", "PA") for k in kinds) else []
        extra = f" ({'; '.join(notes)})" if notes else ""
        parts.append(f"converted {counts} image(s) to {'RGB' if target == 'RGB' else 'grayscale'}{extra}")
    if sizes:
        shown = sizes.most_common(3)
        listed = ", ".join(
            f"{n} image(s) from {size}" if i == 0 else f"{n} from {size}" for i, (size, n) in enumerate(shown)
        )
        rest = sum(sizes.values()) - sum(n for _, n in shown)
        others = f" and {rest} of other sizes" if rest else ""
        aspect = any(w != h for w, h in (map(int, size.split("x")) for size in sizes))
        parts.append(
            f"resized {listed}{others} to {image_size}x{image_size}"
            + (" (aspect ratio not kept)" if aspect else "")
        )
    return "; ".join(parts) or None


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
