"""How good are a diffusion model's unconditional samples? One JSON line of generator-quality figures.

For Colored MNIST only: S-step deterministic DDIM (η = 0) samples from seeded Gaussian noise, read by the
shape probe (trained on colour-free training digits, task labels only, `num_samples` training images held
out) and the palette colour estimator (`diffinject.measures.sample_quality`). Prints the samples'
recognised rate, palette-close rate and Fréchet distance in the probe's feature space, each beside the
held-out real images' own value (`real_recognised`, `real_palette_close`, `frechet_floor`), plus the
seconds spent. Measurement only: nothing is selected by it.

    python benchmarks/sample_quality.py --unet runs/cmnist/1pct/diffusion/unet --samples 256 --steps 50
    python benchmarks/sample_quality.py --real-only     # the real images' own figures, no UNet needed
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from diffinject.data import CMNISTDataModule
from diffinject.diffusion import linear_alphas_cumprod
from diffinject.measures.sample_quality import build_reference, dataset_arrays, sample_unconditional
from diffinject.nets.unet import load_unet_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", help="a diffusion export folder (diffusers UNet + diffusion_info.json)")
    parser.add_argument("--real-only", action="store_true", help="only the real images' own figures")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50, help="DDIM grid size S")
    parser.add_argument("--seed", type=int, default=0, help="noise seed and held-out split seed")
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--clip", action="store_true", help="clip x̂₀ to [-1, 1] on every step")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.real_only and not args.unet:
        parser.error("--unet is required unless --real-only")
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    data = CMNISTDataModule(ratio=args.ratio, source="embedded")
    data.setup("fit")
    images, labels = dataset_arrays(data.train_eval_dataset)
    reference = build_reference(images, labels, data.num_classes, args.samples, seed=args.seed)
    row: dict = {"ratio": args.ratio, "seed": args.seed}
    row["reference_seconds"] = round(time.perf_counter() - start, 2)
    if args.real_only:
        print(json.dumps({**row, **reference.real}), flush=True)
        return

    unet, info = load_unet_export(args.unet)
    abar = linear_alphas_cumprod(int(info["num_train_timesteps"]), info["beta_start"], info["beta_end"])
    start = time.perf_counter()
    samples = sample_unconditional(
        unet, abar, args.samples, args.steps, args.seed, clip=args.clip, image_size=int(info["image_size"])
    )
    sample_seconds = time.perf_counter() - start
    start = time.perf_counter()
    figures = reference.evaluate(samples)
    row.update(
        unet=args.unet,
        global_step=info.get("global_step"),
        steps=args.steps,
        clip=args.clip,
        **figures,
        sample_seconds=round(sample_seconds, 2),
        measure_seconds=round(time.perf_counter() - start, 2),
        threads=args.threads,
    )
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
