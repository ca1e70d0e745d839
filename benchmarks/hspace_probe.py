"""What does an injection setting make? Run the inject stage's own code on probe pairs and measure the result.

For CMNIST only (colour and digit shape are both measurable): N (content, style) pairs with different labels
go through `InjectionPredictModule.inject` — exactly the product's code path — once per setting; each
synthetic image is read by the colour estimator and by a shape probe trained on colour-free training digits
(task labels only). One JSON line per setting: how often the output takes the content's or the style's
shape and colour, and how often it is a *new combination* (shape of one image, colour of the other), which is
what debiasing needs. Bias labels are used for measurement only; nothing here feeds the product.

    python benchmarks/hspace_probe.py --unet runs/cmnist/1pct/diffusion/unet --pairs 64 \
        --gammas 0.3 0.7 --t-edits 400 600 --every 1 3
    python benchmarks/hspace_probe.py --unet … --bias runs/cmnist/1pct/seed0/bias/checkpoints/best.ckpt \
        --setting '{"start_from": "content", "gamma": 0, "guidance_scale": 0.3}' --setting '{"gamma": 0.7}'

A setting is a JSON object of `InjectionPredictModule` options (gamma, t_edit, t_start, t_boost, blend,
start_from, inject_from, guidance_scale, guidance_t_min, …); `--bias` fills `bias_model`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from diffinject.data import CMNISTDataModule
from diffinject.measures import synthetic_set
from diffinject.measures.injection_check import injection_check
from diffinject.stages.inject import InjectionPredictModule
from injection_check_rank import spearman  # the sibling benchmark (this folder is on sys.path)


def probe_row(synthetic: np.ndarray, probe, content, style, labels, biases) -> dict[str, float]:
    """The probe's fractions for synthetic images [N, 3, H, W] in [0, 1] made from (content, style)."""
    colour = synthetic_set.estimate_colour_classes(synthetic)
    shape = synthetic_set.probe_predict(probe, synthetic_set.shape_gray(synthetic))
    c_shape, s_shape = shape == labels[content], shape == labels[style]
    c_col, s_col = colour == biases[content], colour == biases[style]
    return {
        "shape=content": float(c_shape.mean()),
        "shape=style": float(s_shape.mean()),
        "colour=content": float(c_col.mean()),
        "colour=style": float(s_col.mean()),
        "content shape + style colour": float((c_shape & s_col).mean()),
        "style shape + content colour": float((s_shape & c_col).mean()),
        "colour != content label colour": float((colour != labels[content]).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", required=True)
    parser.add_argument("--bias", default=None, help="bias-stage checkpoint (for guidance settings)")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50, help="DDIM grid size S (inversion and generation)")
    parser.add_argument("--setting", action="append", default=[], help="JSON object of inject options")
    parser.add_argument("--every", type=int, nargs="+", default=[1], help="grid: inject on every k-th step")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.3, 0.7])
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
    probe = synthetic_set.train_shape_probe(synthetic_set.shape_gray(images.numpy()), labels, num_classes=10)

    rng = np.random.default_rng(args.seed)
    content = rng.choice(len(train), args.pairs, replace=False)
    style = np.array([rng.choice(np.flatnonzero(labels != labels[c])) for c in content])
    batch = {
        "style_image": images[style],
        "content_image": images[content],
        "content_index": torch.as_tensor(content),
        "noise_seed": torch.arange(args.pairs) + 1000 * args.seed,
    }

    settings = [json.loads(s) for s in args.setting] or [
        {"gamma": g, "t_edit": te, "t_boost": tb, "inject_every": k}
        for g, te, tb, k in itertools.product(args.gammas, args.t_edits, args.t_boosts, args.every)
    ]
    rows = []
    for setting in settings:
        options = {"steps": args.steps, **setting}
        if args.bias is not None:
            options.setdefault("bias_model", args.bias)
        start = time.perf_counter()
        module = InjectionPredictModule(unet=args.unet, **options)
        with torch.no_grad():
            synthetic = module.inject(batch).numpy()
        row = {"setting": setting, **probe_row(synthetic, probe, content, style, labels, biases)}
        row["seconds"] = round(time.perf_counter() - start, 1)
        if module.bias_net is not None:  # the label-free check on the same images, for the ranking below
            check = injection_check(
                module.bias_net, module.unet, torch.from_numpy(synthetic), images[content], images[style],
                module.model_size,
            )  # fmt: skip
            row.update({f"check {k}": check[k] for k in CHECK_KEYS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) > 2 and "check moved_and_retained" in rows[0]:
        target = [r["content shape + style colour"] for r in rows]
        ranks = {k: spearman([r[f"check {k}"] for r in rows], target) for k in CHECK_KEYS}
        print(json.dumps({"spearman vs content shape + style colour": ranks}), flush=True)


#: the label-free check's figures reported beside the probe's
CHECK_KEYS = ("bias_moved", "content_retention", "moved_and_retained")


if __name__ == "__main__":
    main()
