"""Injection throughput: the reference scheme vs the optimised one, same UNet, same pairs, same run (JSON).

Schemes (all S DDIM steps, injection for t ≥ t_edit, η = 1 for t ≤ t_boost):
- ``naive``: the reference's work per pair, one pair at a time: invert the content (recording h) and the
  style, then generate with two full UNet passes on every injected step (h-space hook).
- ``naive_batched``: the same work in batches (separates batching from the algorithmic savings).
- ``optimised``: batched; every distinct content inverted once and its h cached; on injected steps encoder
  + mid once and the decoder for h and h̃ in one concatenated batch (what `InjectionPredictModule` runs).
Content-inversion time is included in every scheme. Also reported: peak memory, the largest difference
between optimised and naive outputs, and with `--autocast` the bf16 variants and the DDIM reconstruction
error (inversion → generation, no injection) each adds; that error is only meaningful for a trained UNet
(`--unet runs/<dataset>/<pct>/diffusion/unet`), a random one's DDIM round trip diverges.

    python benchmarks/injection.py --preset cmnist-small --steps 50 --num-pairs 64 --device cpu
    python benchmarks/injection.py --preset cmnist-paper --steps 50 --num-pairs 2048 --batch-size 512 \\
        --device cuda --autocast --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffinject.diffusion import (
    Injection,
    ddim_generate,
    ddim_invert,
    ddim_timesteps,
    linear_alphas_cumprod,
    to_model_space,
)
from diffinject.nets.unet import build_unet, load_unet_export


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="cmnist-small", help="UNet preset (random weights) unless --unet")
    parser.add_argument("--unet", default=None, help="a diffusion export folder (trained weights)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--num-pairs", type=int, default=64)
    parser.add_argument("--naive-pairs", type=int, default=None, help="pairs timed one by one (default ≤ 16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pool", type=int, default=100, help="distinct content images (K × classes)")
    parser.add_argument("--image-size", type=int, default=28, help="dataset image side (padded/resized)")
    parser.add_argument("--gamma", type=float, default=0.7)
    parser.add_argument("--t-edit", type=int, default=400)
    parser.add_argument("--t-boost", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", action="store_true", help="also time bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--recon-images", type=int, default=32, help="images for the reconstruction error")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_for(n: int, size: int, channels: int, seed: int) -> Tensor:
    """CMNIST digits when the shape fits (embedded, no download), else smooth random images; [0, 1]."""
    if size == 28 and channels == 3:
        with contextlib.suppress(Exception):
            from diffinject.data import CMNISTDataModule

            data = CMNISTDataModule(root="/tmp/diffinject-bench-data", source="embedded")
            data.setup("fit")
            train = data.train_eval_dataset
            return torch.stack([train[i]["image"] for i in range(min(n, len(train)))])
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, channels, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)


class Runner:
    """Holds the UNet, schedule and pairs; each scheme returns images in model space, in pair order."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        if args.unet:
            unet, info = load_unet_export(args.unet)
            self.trained = True
            self.T = int(info.get("num_train_timesteps", 1000))
        else:
            unet, self.trained, self.T = build_unet(args.preset), False, 1000
        self.unet = unet.to(self.device).eval().requires_grad_(False)
        if args.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.size = int(self.unet.config.sample_size)
        self.channels = int(self.unet.config.in_channels)
        self.abar = linear_alphas_cumprod(self.T)
        self.grid = ddim_timesteps(self.T, args.steps)
        rng = np.random.default_rng(args.seed)
        total = args.pool + args.num_pairs
        self.images = images_for(total, args.image_size, self.channels, args.seed)
        n_img = len(self.images)
        self.content = rng.integers(0, min(args.pool, n_img), args.num_pairs)
        self.style = rng.integers(min(args.pool, n_img - 1), n_img, args.num_pairs)
        self.noise_seeds = rng.integers(0, 2**62, args.num_pairs)

    def model_space(self, idx: np.ndarray) -> Tensor:
        return to_model_space(self.images[torch.as_tensor(idx)], self.size).to(self.device)

    def noise_fn(self, pairs: np.ndarray, shape: tuple[int, ...]) -> Callable[[int], Tensor]:
        gens = [torch.Generator().manual_seed(int(self.noise_seeds[p])) for p in pairs]
        return lambda i: torch.stack([torch.randn(shape, generator=g) for g in gens]).to(self.device)

    def autocast(self, enabled: bool) -> Any:
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=enabled and self.device.type == "cuda"
        )

    def generate(
        self, pairs: np.ndarray, h: Tensor, slots: Tensor | None, shared: bool, bf16: bool | str
    ) -> Tensor:
        args = self.args
        with self.autocast(bf16 == "all"):
            latent = ddim_invert(self.unet, self.model_space(self.style[pairs]), self.abar, self.grid).latent
        injection = Injection(h, gamma=args.gamma, t_edit=args.t_edit, slots=slots)
        with self.autocast(bool(bf16)):
            return ddim_generate(
                self.unet, latent, self.abar, self.grid, t_boost=args.t_boost,
                noise=self.noise_fn(pairs, tuple(latent.shape[1:])), injection=injection,
                shared_encoder=shared,
            )  # fmt: skip

    def naive(self, pairs: np.ndarray, batch: int, bf16: bool | str = False) -> Tensor:
        out = []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            with self.autocast(bf16 == "all"):
                h = ddim_invert(
                    self.unet, self.model_space(self.content[chunk]), self.abar, self.grid, record_h=True,
                    shared_encoder=False,
                ).h  # fmt: skip
            out.append(self.generate(chunk, h, None, shared=False, bf16=bf16))
        return torch.cat(out)

    def optimised(self, pairs: np.ndarray, batch: int, bf16: bool | str = False) -> Tensor:
        distinct = np.unique(self.content[pairs])
        pool = []
        for start in range(0, len(distinct), batch):
            with self.autocast(bf16 == "all"):
                x = self.model_space(distinct[start : start + batch])
                inv = ddim_invert(self.unet, x, self.abar, self.grid, record_h=True)
            pool.append(inv.h)
        h_pool = torch.cat(pool)
        slot_of = {int(c): i for i, c in enumerate(distinct)}
        out = []
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            slots = torch.tensor([slot_of[int(c)] for c in self.content[chunk]], device=self.device)
            out.append(self.generate(chunk, h_pool, slots, shared=True, bf16=bf16))
        return torch.cat(out)

    def reconstruction_mse(self, n: int, bf16: bool | str) -> float:
        x = self.model_space(np.arange(min(n, len(self.images))))
        with self.autocast(bf16 == "all"):
            latent = ddim_invert(self.unet, x, self.abar, self.grid).latent
        with self.autocast(bool(bf16)):
            rec = ddim_generate(self.unet, latent, self.abar, self.grid)
        return float(((rec.float() - x) ** 2).mean())


@contextlib.contextmanager
def measured(device: torch.device, result: dict[str, Any], n: int) -> Iterator[None]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    seconds = time.perf_counter() - start
    result.update(pairs=n, seconds=round(seconds, 3), images_per_s=round(n / seconds, 3))
    if device.type == "cuda":
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:  # process-wide high-water mark (monotone across schemes)
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    runner = Runner(args)
    device = runner.device
    pairs = np.arange(args.num_pairs)
    naive_pairs = pairs[: args.naive_pairs if args.naive_pairs is not None else min(16, args.num_pairs)]
    runner.optimised(pairs[: min(2, len(pairs))], 2)  # warm-up (kernels, allocator)

    results: dict[str, Any] = {"naive": {}, "naive_batched": {}, "optimised": {}}
    with measured(device, results["naive"], len(naive_pairs)):
        naive_out = runner.naive(naive_pairs, batch=1)
    with measured(device, results["naive_batched"], len(pairs)):
        runner.naive(pairs, batch=args.batch_size)
    with measured(device, results["optimised"], len(pairs)):
        fast_out = runner.optimised(pairs, batch=args.batch_size)
    diff = (fast_out[: len(naive_pairs)] - naive_out).abs().max().item()
    report: dict[str, Any] = {
        "benchmark": "injection",
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "unet": args.unet or f"preset {args.preset} (random weights)",
        "unet_params_m": round(sum(p.numel() for p in runner.unet.parameters()) / 1e6, 2),
        "model_size": runner.size,
        "steps": args.steps,
        "gamma": args.gamma,
        "t_edit": args.t_edit,
        "t_boost": args.t_boost,
        "batch_size": args.batch_size,
        "distinct_contents": int(len(np.unique(runner.content))),
        "channels_last": args.channels_last,
        **results,
        "speedup_vs_naive": round(results["optimised"]["images_per_s"] / results["naive"]["images_per_s"], 2),
        "speedup_vs_naive_batched": round(
            results["optimised"]["images_per_s"] / results["naive_batched"]["images_per_s"], 2
        ),
        "max_abs_diff_optimised_vs_naive": diff,
        "trained_unet": runner.trained,
        "reconstruction_mse_fp32": runner.reconstruction_mse(args.recon_images, False),
    }
    if args.autocast and device.type == "cuda":
        for name, mode in (("optimised_bf16_generation", True), ("optimised_bf16_all", "all")):
            results_bf16: dict[str, Any] = {}
            with measured(device, results_bf16, len(pairs)):
                out = runner.optimised(pairs, batch=args.batch_size, bf16=mode)
            results_bf16["max_abs_diff_vs_fp32"] = (out.float() - fast_out).abs().max().item()
            results_bf16["mean_abs_diff_vs_fp32"] = (out.float() - fast_out).abs().mean().item()
            results_bf16["reconstruction_mse"] = runner.reconstruction_mse(args.recon_images, mode)
            report[name] = results_bf16
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return report


if __name__ == "__main__":
    main()
