"""Shared helpers for the DDIM / injection tests: a tiny UNet and a quick way to train it on a few images."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

from diffinject.diffusion import linear_alphas_cumprod


def tiny_unet(size: int = 16, channels: int = 3, seed: int = 0) -> UNet2DModel:
    """Two levels (plain + attention) so every supported block type is exercised; h is 32×(size/2)²."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=16,
    )


def blob_images(n: int, size: int = 16, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Smooth random colour images in model space [-1, 1] (upsampled 4×4 noise): easy to learn, distinct."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False) * 2 - 1


def train_tiny_unet(images: torch.Tensor, steps: int = 300, seed: int = 0) -> UNet2DModel:
    """ε-prediction training on `images` (model space) for a few hundred Adam steps (~5 s on 2 CPU cores).

    A trained ε is smooth enough along the DDIM path for inversion + generation to round-trip; an
    untrained UNet's ε is not (its round trip diverges), so the reconstruction tests need this.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: extra threads only add contention on a shared 2-core box
    try:
        return _train(images, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train(images: torch.Tensor, steps: int, seed: int) -> UNet2DModel:
    unet = tiny_unet(images.shape[-1], images.shape[1], seed)
    g = torch.Generator().manual_seed(seed)
    abar = linear_alphas_cumprod().float()
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    unet.train()
    for _ in range(steps):
        t = torch.randint(0, abar.shape[0], (images.shape[0],), generator=g)
        noise = torch.randn(images.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        loss = ((unet(a.sqrt() * images + (1 - a).sqrt() * noise, t).sample - noise) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return unet.eval().requires_grad_(False)


def write_unet_export(unet: UNet2DModel, export_dir, image_size: int) -> None:
    """Save `unet` the way the diffusion stage exports it (save_pretrained + diffusion_info.json)."""
    from diffinject.diffusion import PREPROCESS_RULE
    from diffinject.nets.unet import save_unet_export

    info = {
        "format": "diffinject-diffusion-v1",
        "image_size": image_size,
        "model_size": int(unet.config.sample_size),
        "in_channels": int(unet.config.in_channels),
        "preprocess": PREPROCESS_RULE,
        "prediction_type": "epsilon",
        "num_train_timesteps": 1000,
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "global_step": 300,
    }
    save_unet_export(unet, export_dir, info)


def write_topk(path, labels, biases, k: int, seed: int = 0) -> None:
    """A hand-made top-K file: per class the conflicting images first (high loss), then random fill.

    Also writes the sibling `topk_scores.csv` with a loss for every image (conflicting high, aligned low),
    the way `TopKWriter(write_scores=True)` does.
    """
    import csv

    import numpy as np

    rng = np.random.default_rng(seed)
    labels, biases = np.asarray(labels), np.asarray(biases)
    losses = np.where(labels != biases, 3.0, 0.05) + rng.uniform(0, 0.5, len(labels))
    rows = []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        top = idx[np.argsort(-losses[idx], kind="stable")][:k]
        rows += [(int(i), int(label), float(losses[i]), r + 1, int(biases[i])) for r, i in enumerate(top)]
    for target, table in (
        (path, rows),
        (path.with_name(f"{path.stem}_scores.csv"),
         [(i, int(labels[i]), float(losses[i]), 0, int(biases[i])) for i in range(len(labels))]),
    ):  # fmt: skip
        with open(target, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["index", "label", "loss", "rank", "bias"])
            writer.writerows(table)
