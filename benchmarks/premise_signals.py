"""Label-free signals, before any diffusion model exists, that a dataset is biased the way DiffInject assumes.

The inject gate's premise check (`callbacks/gate.py`) needs the synthetic set, i.e. the 25-minute diffusion
stage, and at CMNIST 5 % it cannot tell "weaker bias" from "no shortcut" (docs/results/bias-trees.md). This
script measures cheaper candidates from the two classifier stages every run already has — the GCE bias model
and Vanilla ERM — on the training and validation splits, using class labels only:

- `bias_train_wrong`: share of training images the bias model's argmax gets wrong (its top-K pool);
- `bias_wrong_conf`: mean max-softmax of the bias model on those (a shortcut is confidently wrong);
- `bias_wrong_p_label`: mean probability it gives their true class (≈ 0 when an attribute decides);
- `val_acc_bias`, `val_acc_vanilla`, and on the validation images the bias model gets wrong:
  `val_wrong_n`, `vanilla_right_on_bias_wrong`, `vanilla_same_wrong_class` (Vanilla makes the bias model's
  mistake: it shares the shortcut);
- `val_z` and its counts: `measures.injection_check.paired_accuracy` of the bias model against Vanilla on the
  validation split (the signal the inject gate's premise check now also uses).

Bias labels are read for one analysis column only: `bias_wrong_conflicting`, the share of the bias model's
training mistakes that are truly bias-conflicting (its top-K precision, in effect). One JSON line per seed.

    python benchmarks/premise_signals.py --run runs/cmnist/1pct --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import yaml

from diffinject.data.sections import source_data_section
from diffinject.measures.injection_check import paired_accuracy, predict_probs
from diffinject.report.synthetic import NON_DATA_ARGS, resolve_class
from diffinject.stages.weights import load_classifier_checkpoint


def build_data(run: Path, seed: int) -> Any:
    """The seed's dataset as its bias stage read it (fit splits set up)."""
    path = run / f"seed{seed}" / "bias" / "pipeline_config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the bias stage for seed {seed} first")
    section = source_data_section(yaml.safe_load(path.read_text()) or {})
    if section is None:
        raise ValueError(f"{path}: no data section")
    init = {k: v for k, v in (section.get("init_args") or {}).items() if k not in NON_DATA_ARGS}
    module = resolve_class(section["class_path"])(**init)
    module.setup("fit")
    return module


def split_tensors(dataset: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images [0, 1], labels and biases (−1 unknown) of a whole split, in index order."""
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([item["image"] for item in items]).float()
    labels = torch.tensor([int(item["label"]) for item in items])
    biases = torch.tensor([int(item["bias"]) for item in items])
    return images, labels, biases


def _mean(values: torch.Tensor) -> float | None:
    return round(float(values.float().mean()), 4) if values.numel() else None


def signals(bias_probs: dict[str, torch.Tensor], vanilla_val: torch.Tensor, data: dict[str, tuple]) -> dict:
    """The figures above from the two models' softmax outputs (pure: tensors in, numbers out)."""
    _, train_labels, train_biases = data["train"]
    _, val_labels, _ = data["val"]
    train = bias_probs["train"]
    wrong = train.argmax(1) != train_labels
    p_label = train.gather(1, train_labels[:, None]).squeeze(1)
    known = train_biases >= 0
    conflicting = (train_biases != train_labels) & known
    val_pred, vanilla_pred = bias_probs["val"].argmax(1), vanilla_val.argmax(1)
    val_wrong = val_pred != val_labels
    paired = paired_accuracy(~val_wrong, vanilla_pred == val_labels)
    return {
        "bias_train_wrong": _mean(wrong),
        "bias_train_wrong_n": int(wrong.sum()),
        "bias_wrong_conf": _mean(train.max(1).values[wrong]),
        "bias_wrong_p_label": _mean(p_label[wrong]),
        "bias_wrong_conflicting": _mean(conflicting[wrong & known]) if bool(known.any()) else None,
        "val_acc_bias": _mean(~val_wrong),
        "val_acc_vanilla": _mean(vanilla_pred == val_labels),
        "val_wrong_n": int(val_wrong.sum()),
        "vanilla_right_on_bias_wrong": _mean((vanilla_pred == val_labels)[val_wrong]),
        "vanilla_same_wrong_class": _mean((vanilla_pred == val_pred)[val_wrong]),
        **{f"val_{k}": v for k, v in paired.items()},
    }


def measure(run: Path, seed: int) -> dict[str, Any]:
    module = build_data(run, seed)
    data = {"train": split_tensors(module.train_eval_dataset), "val": split_tensors(module.val_dataset)}
    expect = {"num_classes": module.num_classes}
    nets = {
        name: load_classifier_checkpoint(run / f"seed{seed}" / name / "checkpoints" / "best.ckpt", expect)[0]
        for name in ("bias", "vanilla")
    }
    bias_probs = {split: predict_probs(nets["bias"], data[split][0]) for split in ("train", "val")}
    vanilla_val = predict_probs(nets["vanilla"], data["val"][0])
    return {"run": str(run), "seed": seed, **signals(bias_probs, vanilla_val, data)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run root, e.g. runs/cmnist/1pct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        rows.append(measure(args.run, seed))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
