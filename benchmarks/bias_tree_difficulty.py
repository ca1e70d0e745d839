"""Which is easier for the LfF MLP, the digit or the bias attribute? (JSON to stdout)

A debiasing method assumes the bias is the shortcut: learnt before the target. For each bias type of
`make_bias_trees.py` (and CMNIST's digit colour as the reference), two MLPs (`MLPClassifier`, 3 × 100, Adam
1e-3, batch 256: the CMNIST recipe) are trained on the 3,600 training digits with the bias value spread
uniformly inside every class (label and bias independent), one to predict the digit, one the bias value; each
one's accuracy on the 1,000 test digits (also uniform) after each of `--epochs` says which attribute is
learnt faster. `vanilla_biased` trains the digit MLP on the real biased training split (`--ratio`) and
reports its test accuracy on aligned and on conflicting images (how much the bias hurts without debiasing)
after the last epoch. Accuracies are means over `--seeds`. CPU, one thread; seconds per bias type and seed.

    python benchmarks/bias_tree_difficulty.py --seeds 0 1 2 --epochs 1 5
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np
import torch
from torch import nn

from diffinject.data.cmnist import colorize, sample_colors
from diffinject.data.protocol import assign_uniform, rng_for
from diffinject.nets.classifiers import MLPClassifier
from make_bias_trees import BIASES, BiasFn, protocol_splits, render


def cmnist_colour(digit: np.ndarray, bias: int, rng: np.random.Generator) -> np.ndarray:
    """The CMNIST reference: digit times LfF colour `bias` (std 0.005), black background."""
    colours = sample_colors(np.array([bias]), 0.005, rng)
    return colorize(digit[None], colours)[0].transpose(1, 2, 0)


KINDS: dict[str, BiasFn] = {**BIASES, "cmnist-colour": cmnist_colour}


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def train_curve(
    x: torch.Tensor, y: np.ndarray, tests: dict[str, tuple[torch.Tensor, np.ndarray]], epochs: int, seed: int
) -> list[dict[str, float]]:
    """Test accuracies after every epoch of the CMNIST recipe (Adam 1e-3, batch 256, no augmentation)."""
    torch.manual_seed(seed)
    net = MLPClassifier(x[0].numel(), 10)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    target = torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(epochs):
        net.train()
        for batch in torch.randperm(len(x), generator=generator).split(256):
            optimiser.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), target[batch]).backward()
            optimiser.step()
        net.eval()
        with torch.no_grad():
            curve.append(
                {
                    name: float((net(tx).argmax(1) == torch.from_numpy(ty)).float().mean())
                    for name, (tx, ty) in tests.items()
                }
            )
    return curve


def measure(kind: str, seed: int, ratio: float, epochs: list[int]) -> dict[str, Any]:
    """Digit vs bias learnability on bias-balanced data, and a vanilla MLP on the biased split."""
    fn = KINDS[kind]
    splits = protocol_splits(ratio, seed)
    train_x, train_y, biased = splits["train"]
    test_x, test_y, test_b = splits["test"]
    balanced = assign_uniform(train_y, 10, rng_for(seed, "difficulty/balanced"))
    x_bal = _tensor(render(train_x, balanced, fn, rng_for(seed, f"difficulty/{kind}/balanced")))
    x_test = _tensor(render(test_x, test_b, fn, rng_for(seed, f"difficulty/{kind}/test")))
    last = max(epochs)
    digit = train_curve(x_bal, train_y, {"acc": (x_test, test_y)}, last, seed)
    bias = train_curve(x_bal, balanced, {"acc": (x_test, test_b)}, last, seed)
    x_biased = _tensor(render(train_x, biased, fn, rng_for(seed, f"difficulty/{kind}/biased")))
    aligned = test_y == test_b
    vanilla = train_curve(
        x_biased,
        train_y,
        {"aligned": (x_test[aligned], test_y[aligned]), "conflicting": (x_test[~aligned], test_y[~aligned])},
        last,
        seed,
    )[-1]
    return {
        "digit_acc": {f"epoch_{e}": digit[e - 1]["acc"] for e in epochs},
        "bias_acc": {f"epoch_{e}": bias[e - 1]["acc"] for e in epochs},
        "vanilla_biased": vanilla,
    }


def _mean(runs: list[Any]) -> Any:
    """Element-wise mean over seeds of nested dicts of accuracies."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: _mean([run[key] for run in runs]) for key in first}
    return np.round(np.mean(runs, axis=0), 4).tolist()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 5], help="report after these epochs")
    args = parser.parse_args(argv)
    if min(args.epochs) < 1 or not 0.0 < args.ratio < 1.0:
        parser.error(f"need --epochs >= 1 and --ratio in (0, 1), got {args.epochs} and {args.ratio}")
    epochs = sorted(set(args.epochs))
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "protocol": f"MLP 3x100, Adam 1e-3, batch 256; accuracy on the 1,000 test digits; vanilla_biased: "
        f"trained on the {args.ratio:g} split, after epoch {epochs[-1]}",
        "seeds": args.seeds,
    }
    for kind in args.kinds:
        result[kind] = _mean([measure(kind, seed, args.ratio, epochs) for seed in args.seeds])
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
