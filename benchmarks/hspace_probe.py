"""What does the h-space carry? Inject content into style for a grid of settings and measure the result.

For CMNIST only (colour and digit shape are both measurable): for each setting, N (content, style) pairs
with different labels are inverted and regenerated with injection, then each synthetic image is read by the
colour estimator and by a shape probe trained on colour-free training digits (task labels only). It prints
one JSON line per setting: how often the output takes the content's or the style's shape and colour, and
how often it is a *new combination* (shape of one image, colour of the other), which is what debiasing
needs. Bias labels are used for measurement only.

    python benchmarks/hspace_probe.py --unet runs/cmnist/1pct/diffusion/unet --pairs 64 \
        --gammas 0.1 0.3 0.5 --t-edits 400 600 800 --t-boosts 0 200
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from diffinject import analysis
from diffinject.data import CMNISTDataModule
from diffinject.diffusion import (
    Injection,
    ddim_generate,
    ddim_invert,
    ddim_timesteps,
    from_model_space,
    linear_alphas_cumprod,
    to_model_space,
)
from diffinject.nets.unet import load_unet_export


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", required=True)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="DDIM grid size S (inversion and generation)")
    parser.add_argument("--every", type=int, nargs="+", default=[1], help="inject on every k-th step")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7])
    parser.add_argument("--t-edits", type=int, nargs="+", default=[400])
    parser.add_argument("--t-boosts", type=int, nargs="+", default=[200])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = CMNISTDataModule(ratio=args.ratio, source="embedded")
    data.setup("fit")
    train = data.train_eval_dataset
    images = torch.stack([train[i]["image"] for i in range(len(train))])
    labels = np.array([train[i]["label"] for i in range(len(train))])
    biases = np.array([train[i]["bias"] for i in range(len(train))])
    gray = analysis.shape_gray(images.numpy())
    probe = analysis.train_shape_probe(gray, labels, num_classes=10)

    rng = np.random.default_rng(args.seed)
    content = rng.choice(len(train), args.pairs, replace=False)
    style = np.array([rng.choice(np.flatnonzero(labels != labels[c])) for c in content])

    unet, info = load_unet_export(args.unet)
    unet.eval()
    size = int(info["model_size"])
    abar = linear_alphas_cumprod(int(info["num_train_timesteps"]), info["beta_start"], info["beta_end"])
    grid = ddim_timesteps(len(abar), args.steps)
    with torch.no_grad():
        x_c = to_model_space(images[content], size)
        x_s = to_model_space(images[style], size)
        inv_c = ddim_invert(unet, x_c, abar, grid, record_h=True)
        inv_s = ddim_invert(unet, x_s, abar, grid)
    settings = itertools.product(args.gammas, args.t_edits, args.t_boosts, args.every)
    for gamma, t_edit, t_boost, every in settings:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            out = ddim_generate(
                unet,
                inv_s.latent,
                abar,
                grid,
                t_boost=t_boost,
                generator=generator,
                injection=Injection(inv_c.h, gamma, t_edit, every=every),
            )
        synthetic = from_model_space(out, images.shape[-1]).clamp(0, 1).numpy()
        colour = analysis.estimate_colour_classes(synthetic)
        shape = analysis.probe_predict(probe, analysis.shape_gray(synthetic))
        c_shape, s_shape = shape == labels[content], shape == labels[style]
        c_col, s_col = colour == biases[content], colour == biases[style]
        row = {
            "gamma": gamma,
            "t_edit": t_edit,
            "t_boost": t_boost,
            "steps": args.steps,
            "every": every,
            "shape=content": float(c_shape.mean()),
            "shape=style": float(s_shape.mean()),
            "colour=content": float(c_col.mean()),
            "colour=style": float(s_col.mean()),
            "content shape + style colour": float((c_shape & s_col).mean()),
            "style shape + content colour": float((s_shape & c_col).mean()),
            "colour != shape (conflicting)": float((colour != shape).mean()),
            "seconds": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
