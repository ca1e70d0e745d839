"""Train-loader throughput (images/s): embedded CMNIST and a generated 224 px folder dataset; JSON out.

Usage: python benchmarks/data_throughput.py [--num-workers 2] [--batch-size 256] [--folder-batch-size 64]

The folder dataset is written into a temporary directory (`--folder-images` PNGs of `--png-size` px, smooth
random content so PNG sizes resemble photos) and read through `FolderDataModule` exactly as BFFHQ would be:
decode + resize to 224 + RandomCrop(padding 4) + flip, in the DataLoader workers. The first epoch includes
worker start-up; later epochs reuse the persistent workers ("steady").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffinject.data import CMNISTDataModule, FolderDataModule


def _epoch_rates(loader, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, seen = time.perf_counter(), 0
        for batch in loader:
            seen += len(batch["index"])
        rates.append(seen / (time.perf_counter() - start))
    return rates


def _summary(rates: list[float]) -> dict:
    steady = rates[1:] or rates
    return {
        "images_per_s_first_epoch": round(rates[0], 1),
        "images_per_s_steady": round(float(np.median(steady)), 1),
        "epochs": len(rates),
    }


def bench_cmnist(num_workers: int, batch_size: int, epochs: int) -> dict:
    start = time.perf_counter()
    dm = CMNISTDataModule(source="embedded", ratio=0.01, batch_size=batch_size, num_workers=num_workers)
    dm.setup("fit")
    build_s = time.perf_counter() - start
    result = {"images": len(dm.train_dataset), "batch_size": batch_size, "build_s": round(build_s, 3)}
    return {**result, **_summary(_epoch_rates(dm.train_dataloader(), epochs))}


def _write_folder_dataset(root: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, side, dtype=np.float32)
    for i in range(count):
        label = i % 2
        split = ("align" if rng.random() > 0.05 else "conflict") if i < count - 16 else None
        bias = label if split != "conflict" else 1 - label
        if split is None:  # a few validation and test images so setup succeeds
            folder = root / "bench" / ("valid" if i % 4 < 2 else "test") / str(label)
        else:
            folder = root / "bench" / "1pct" / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        freq = rng.uniform(1, 6, size=(3, 2))
        phase = rng.uniform(0, 6.3, size=3)
        channels = [
            np.sin(freq[c, 0] * 6.3 * grid[:, None] + freq[c, 1] * 6.3 * grid[None, :] + phase[c])
            for c in range(3)
        ]
        image = (np.stack(channels, -1) * 0.4 + 0.5 + rng.normal(0, 0.03, size=(side, side, 3))).clip(0, 1)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{i}_{label}_{bias}.png")


def bench_folder(num_workers: int, batch_size: int, epochs: int, count: int, side: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="diffinject-bench-") as tmp:
        start = time.perf_counter()
        _write_folder_dataset(Path(tmp), count, side)
        write_s = time.perf_counter() - start
        dm = FolderDataModule(
            tmp,
            "bench",
            "1pct",
            image_size=224,
            num_classes=2,
            batch_size=batch_size,
            num_workers=num_workers,
        )
        dm.setup("fit")
        png_kb = np.mean([os.path.getsize(p) for p in dm.train_eval_dataset.paths]) / 1024
        result = {
            "images": len(dm.train_dataset),
            "batch_size": batch_size,
            "png_side": side,
            "mean_png_kb": round(float(png_kb), 1),
            "generate_s": round(write_s, 2),
        }
        rates = _epoch_rates(dm.train_dataloader(), epochs)
    return {**result, **_summary(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="CMNIST batch size")
    parser.add_argument("--folder-batch-size", type=int, default=64)
    parser.add_argument("--folder-images", type=int, default=512)
    parser.add_argument(
        "--png-size", type=int, default=256, help="side of the generated PNGs (resized to 224)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "num_workers": args.num_workers,
        "cmnist_embedded": bench_cmnist(args.num_workers, args.batch_size, args.epochs),
        "folder_224px": bench_folder(
            args.num_workers, args.folder_batch_size, args.epochs, args.folder_images, args.png_size
        ),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
