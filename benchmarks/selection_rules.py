"""Which epoch would each checkpoint-selection rule pick, and what test accuracy does it get?

Refits one classifier stage of a finished pipeline run (its own `pipeline_config.yaml`, same seed) in a
scratch folder with a callback that, after every validation epoch, records: plain val accuracy, the
pseudo-group balanced val accuracy (groups from the seed's GCE bias model, no bias labels) and the test
accuracy. Prints one JSON line per rule: the epoch it selects and that epoch's test accuracy, beside the
last epoch and the (unattainable, test-selected) best epoch. Test numbers are for this analysis only.

    python benchmarks/selection_rules.py runs/cmnist/1pct --stage debias --seed 0
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from diffinject.cli import main as cli_main
from diffinject.stages.weights import load_classifier_checkpoint


class EpochRecorder(Callback):
    """Per validation epoch: val accuracy, pseudo-group balanced val accuracy and test accuracy."""

    def __init__(self, bias_checkpoint: str) -> None:
        self.bias_checkpoint = bias_checkpoint
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.bias_net = load_classifier_checkpoint(self.bias_checkpoint, {})[0].eval()
        trainer.datamodule.setup("test")

    @torch.no_grad()
    def _predict(self, model: torch.nn.Module, loader: Any) -> dict[str, torch.Tensor]:
        preds, labels, bias_preds = [], [], []
        for batch in loader:
            preds.append(model(batch["image"]).argmax(1))
            labels.append(batch["label"])
            bias_preds.append(self.bias_net(batch["image"]).argmax(1))
        return {"pred": torch.cat(preds), "label": torch.cat(labels), "bias_pred": torch.cat(bias_preds)}

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        training = pl_module.training
        pl_module.eval()
        val = self._predict(pl_module, trainer.datamodule.val_dataloader())
        test = self._predict(pl_module, trainer.datamodule.test_dataloader())
        pl_module.train(training)
        right = (val["pred"] == val["label"]).float()
        agree = val["bias_pred"] == val["label"]
        groups = [right[agree].mean()] + ([right[~agree].mean()] if (~agree).any() else [])
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "val/acc": float(right.mean()),
                "val/acc_pseudo_balanced": float(sum(groups) / len(groups)),
                "test/acc": float((test["pred"] == test["label"]).float().mean()),
            }
        )


def pick(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The first epoch with the highest `key` (as ModelCheckpoint keeps the first of equal scores)."""
    best = max(rows, key=lambda row: (row[key], -row["epoch"]))
    return {"epoch": best["epoch"], "test/acc": best["test/acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="a pipeline run root, e.g. runs/cmnist/1pct")
    parser.add_argument("--stage", default="debias", choices=("vanilla", "lff", "debias"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    seed_dir = Path(args.root) / f"seed{args.seed}"
    config = yaml.safe_load((seed_dir / args.stage / "pipeline_config.yaml").read_text())
    bias = str(seed_dir / "bias" / "checkpoints" / "best.ckpt")
    # by class path, as a user's callback would be given (this folder is on sys.path when run as a script)
    recorder_spec = {"class_path": "selection_rules.EpochRecorder", "init_args": {"bias_checkpoint": bias}}
    with tempfile.TemporaryDirectory() as scratch:
        config["trainer"].update(default_root_dir=scratch, logger=False, enable_progress_bar=False)
        config["trainer"]["callbacks"] = [recorder_spec]
        file = Path(scratch) / "config.yaml"
        file.write_text(yaml.safe_dump(config))
        cli = cli_main(["fit", "--config", str(file), "--seed_everything", str(args.seed)])
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EpochRecorder")
    rows = recorder.rows
    result = {"root": args.root, "stage": args.stage, "seed": args.seed, "epochs": len(rows)}
    for rule in ("val/acc", "val/acc_pseudo_balanced"):
        print(json.dumps({**result, "rule": rule, **pick(rows, rule)}), flush=True)
    last = {"epoch": rows[-1]["epoch"], "test/acc": rows[-1]["test/acc"]}
    print(json.dumps({**result, "rule": "last epoch", **last}))
    print(json.dumps({**result, "rule": "best test (oracle, not allowed)", **pick(rows, "test/acc")}))


if __name__ == "__main__":
    main()
