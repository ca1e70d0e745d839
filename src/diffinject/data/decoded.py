"""Folder splits decoded once, not in every epoch (issue 20 §3).

Decoding every PNG again in every epoch made a classifier stage through `DATASET=folder` take about twice as
long as the same images held in memory by `DATASET=cmnist`. A split is therefore decoded once, at setup, with
the very function the per-item path uses (`datasets.load_image`: same conversion, same resize, same bytes):

- decoded size ≤ `memory_cap_gib`: held as one uint8 N×C×H×W tensor and indexed (as CMNIST's arrays are);
- above the cap: converted once to a `.npy` file in the cache folder (default
  `{root}/{name}/.diffinject-cache/`, a hidden folder the layout scan never reads) and memory-mapped. The file
  name carries a hash of every file's path (relative to the dataset folder), size and mtime, the channels, the
  side and the Pillow version, so an edited tree is read again; older files of the same split are removed. A
  cache folder that cannot be written (read-only tree) or lacks the space falls back to decoding each image
  when it is served, with a one-line warning.

Bad images keep their handling exactly: the screen at setup is unchanged (`base.screen_images`); a file that
passes it but fails to decode (pixel damage under `on_bad_image='error'`) raises the same `BadImageError`,
naming the file, when it is served, as the per-item path does. A split with such a file is never cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import PIL
import torch
from torch.utils.data import DataLoader, Dataset

from diffinject.data.datasets import BadImageError, ImageFileDataset, Transform, _item, load_image
from diffinject.data.tempdirs import _is_stale, _temp_name

log = logging.getLogger("diffinject.data")

#: default cap on one split's decoded pixels held in memory (GiB, 2^30 bytes)
DEFAULT_MEMORY_CAP_GIB = 2.0
CACHE_DIR_NAME = ".diffinject-cache"
#: bump when the decode changes in a way the key does not see
CACHE_FORMAT = 1
#: splits smaller than this decode in the main process even when the data module has workers
PARALLEL_MIN_FILES = 512


def decoded_bytes(count: int, channels: int, image_size: int) -> int:
    return count * channels * image_size * image_size


class _DecodeItems(Dataset):
    """(index, uint8 C×H×W or None, problem) per file: the decode of one split, run in loader workers."""

    def __init__(self, paths: Sequence[str], channels: int, image_size: int) -> None:
        self.paths, self.channels, self.image_size = paths, channels, image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return i, load_image(self.paths[i], self.channels, self.image_size), None
        except BadImageError as error:
            return i, None, str(error)


def _as_list(batch: list) -> list:
    return batch


def decode_into(
    out: torch.Tensor | np.ndarray, paths: Sequence[str], channels: int, image_size: int, num_workers: int = 0
) -> dict[int, str]:
    """Decode every file into `out[i]`; returns the failures as {index: BadImageError message}.

    Never draws from the global RNG (a DataLoader would, for its base seed, unless given its own generator):
    setup must leave the shuffles of training exactly as they were, or the numbers would change.
    """
    items = _DecodeItems(paths, channels, image_size)
    batches: Iterable[list] = ([items[i]] for i in range(len(items)))  # one at a time: never all in RAM
    if num_workers > 0 and len(paths) >= PARALLEL_MIN_FILES:
        batches = DataLoader(
            items, batch_size=64, num_workers=num_workers, collate_fn=_as_list, generator=torch.Generator()
        )
    failures: dict[int, str] = {}
    for batch in batches:
        for i, image, problem in batch:
            if problem is not None:
                failures[i] = problem
            else:
                out[i] = image if isinstance(out, torch.Tensor) else image.numpy()
    return failures


class ArrayFile:
    """A `.npy` file memory-mapped on first use in each process; pickles as its path, never its pixels."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._array: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        return {"path": self.path, "_array": None}


class DecodedImageDataset(ImageFileDataset):
    """A folder split decoded once: pixels from a tensor or an `ArrayFile`; `paths` kept to name files.

    `failures` holds the files that did not decode (index → message); serving one raises `BadImageError`
    as the per-item path would.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: np.ndarray,
        biases: np.ndarray,
        channels: int,
        image_size: int,
        pixels: torch.Tensor | ArrayFile,
        failures: dict[int, str] | None = None,
        transform: Transform | None = None,
        index_offset: int = 0,
    ) -> None:
        super().__init__(paths, labels, biases, channels, image_size, transform, index_offset)
        self.pixels = pixels
        self.failures = dict(failures or {})

    def __getitem__(self, i: int) -> dict:
        problem = self.failures.get(i)
        if problem is not None:
            raise BadImageError(problem)
        if isinstance(self.pixels, ArrayFile):
            image = torch.from_numpy(np.array(self.pixels.array()[i]))
        else:
            image = self.pixels[i]
        return _item(image, self.labels[i], self.biases[i], i + self.index_offset, self.transform)

    def with_transform(self, transform: Transform | None) -> DecodedImageDataset:
        """Same pixels (shared, not copied) under another transform."""
        return DecodedImageDataset(
            self.paths,
            self.labels,
            self.biases,
            self.channels,
            self.image_size,
            self.pixels,
            self.failures,
            transform,
            self.index_offset,
        )


def cache_key(paths: Sequence[str], base: Path, channels: int, image_size: int) -> str:
    """Hash of what the decoded array depends on: each file's relative path, size and mtime (ns), the
    channels, the side and the Pillow version. Raises OSError when a file cannot be stat'ed."""
    digest = hashlib.sha256(f"v{CACHE_FORMAT} {channels} {image_size} PIL {PIL.__version__}\n".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, base)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def _prune(cache_dir: Path, split: str, keep: Path) -> None:
    """Remove older keys of this split (same channels and side) and the temp files of killed conversions."""
    for path in cache_dir.glob(f"{split}-*.npy"):
        if path != keep:
            path.unlink(missing_ok=True)
    for path in cache_dir.glob(".*.tmp-*"):
        head = path.name[: path.name.index(".tmp-") + len(".tmp-")]
        if _is_stale(path, head):
            path.unlink(missing_ok=True)


def cached_array(
    paths: Sequence[str],
    base: Path,
    channels: int,
    image_size: int,
    cache_dir: Path,
    prefix: str,
    num_workers: int = 0,
) -> Path | None:
    """The split's decoded `.npy` in `cache_dir`, converted now unless a current one exists.

    None when a file does not decode or has vanished (the per-item path then names it when served). Raises
    OSError when the folder cannot be written or lacks the space.
    """
    shape = (len(paths), channels, image_size, image_size)
    try:
        key = cache_key(paths, base, channels, image_size)
    except OSError:
        return None  # a file vanished since the scan: the per-item path names it when served
    split = f"{prefix}-{channels}x{image_size}"
    final = cache_dir / f"{split}-{key}.npy"
    if final.is_file():
        try:
            found = np.load(final, mmap_mode="r")
            if found.shape == shape and found.dtype == np.uint8:
                return final
        except (OSError, ValueError):
            pass  # damaged (e.g. a disk that filled up): converted again below
    cache_dir.mkdir(parents=True, exist_ok=True)
    need = decoded_bytes(*shape[:2], image_size)
    free = shutil.disk_usage(cache_dir).free
    if free < need + (256 << 20):
        raise OSError(f"{free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
    tmp = _temp_name(final, "tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        failures = decode_into(out, paths, channels, image_size, num_workers)
        out.flush()
        del out
        if failures:
            return None
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _prune(cache_dir, split, final)
    log.info("decoded %d images once into %s (%.2f GiB, memory-mapped)", len(paths), final, need / 2**30)
    return final


def decoded_split(
    paths: Sequence[str | Path],
    labels: np.ndarray,
    biases: np.ndarray,
    channels: int,
    image_size: int,
    what: str,
    memory_cap_gib: float,
    cache_dir: Path,
    cache_prefix: str,
    base: Path,
    num_workers: int = 0,
) -> ImageFileDataset:
    """One split, decoded once (see the module docstring): in memory, as an array file, or per item."""
    names = [str(p) for p in paths]
    need = decoded_bytes(len(names), channels, image_size)
    if need <= memory_cap_gib * 2**30:
        pixels = torch.empty((len(names), channels, image_size, image_size), dtype=torch.uint8)
        failures = decode_into(pixels, names, channels, image_size, num_workers)
        log.info("%s: decoded %d images once (%.1f MiB in memory)", what, len(names), need / 2**20)
        return DecodedImageDataset(names, labels, biases, channels, image_size, pixels, failures)
    try:
        array = cached_array(names, base, channels, image_size, cache_dir, cache_prefix, num_workers)
    except OSError as error:
        log.warning(
            "%s: %.2f GiB decoded is above memory_cap_gib=%g and no decode cache can be written in %s (%s); "
            "decoding each image when it is served instead (set cache_dir to a writable folder)",
            what,
            need / 2**30,
            memory_cap_gib,
            cache_dir,
            error,
        )
        array = None
    if array is None:
        return ImageFileDataset(names, labels, biases, channels, image_size)
    return DecodedImageDataset(names, labels, biases, channels, image_size, ArrayFile(array))
