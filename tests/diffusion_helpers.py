"""Tiny CMNIST-like images and a data module for the diffusion tests (no dataset on disk needed)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

PALETTE = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.3, 1.0], [1.0, 1.0, 0.1]])


def cmnist_like(n: int, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` coloured stroke images on black (a bar and a ring per class), [0, 1], plus their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(PALETTE)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = torch.zeros(n, 3, size, size)
    for i, label in enumerate(labels.tolist()):
        cy, cx = (torch.randint(10, size - 10, (2,), generator=g)).tolist()
        radius = 5 + label
        ring = ((yy - cy) ** 2 + (xx - cx) ** 2 - radius**2).abs() < 2 * radius
        bar = (xx - cx).abs() <= 1
        shape = (ring if label % 2 else bar & ((yy - cy).abs() < 8)).float()
        images[i] = shape * PALETTE[label].view(3, 1, 1)
    return images, labels


class TinyImages(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.images, self.labels = cmnist_like(n, seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i]), "bias": -1, "index": i}


class TinyDataModule(LightningDataModule):
    """Stand-in for a `BiasedDataModule`: 28 px RGB items as dicts, same attributes the stage checks."""

    image_size = 28
    channels = 3

    def __init__(self, n: int = 32, batch_size: int = 8) -> None:
        super().__init__()
        self.n, self.batch_size = n, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TinyImages(self.n), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TinyImages(8, seed=1), batch_size=self.batch_size)


TINY_PRESET = "test-tiny"


def register_tiny_preset(monkeypatch) -> str:
    """Add a ~40 k-parameter preset (same block layout as cmnist-small) so loops stay fast on 2 cores."""
    from diffinject.nets.unet import UNET_PRESETS, UNetPreset

    monkeypatch.setitem(UNET_PRESETS, TINY_PRESET, UNetPreset(32, (8, 16, 32), 1, (), 4, 8))
    return TINY_PRESET
