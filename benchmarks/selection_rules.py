"""Which epoch does each checkpoint-selection rule pick, and how far is it from the last and the oracle epoch?

For every (run root, stage, seed) asked for, refits that classifier stage of a finished pipeline run (its own
`pipeline_config.yaml`, same seed) in a scratch folder with a callback that records, after every validation
epoch, which validation images the model gets right and its test accuracy. The seed's GCE bias model scores
the validation split once. Every rule is then applied to the same recorded epochs:

- `val/acc`: plain accuracy on the biased validation split;
- `pseudo (hard)`: the first pseudo-group rule, mean accuracy over "bias model right / wrong";
- `pseudo (soft)`: `val/acc_pseudo_balanced` as the stages log it now (`metrics.PseudoGroupAccuracy`);
- `stage rule`: what `best.ckpt` now is — the soft score, or the last epoch when the pseudo-conflicting group
  has fewer than `--min-group` effective images (`metrics.selection_fallback`);
- `last epoch`, and `oracle`: the best test epoch (for this analysis only, never a selection rule).

Each JSON line gives the selected epoch, its test accuracy and the distance to the last and the oracle epoch;
a markdown table per (root, stage) follows. Test numbers are for this analysis only.

    python benchmarks/selection_rules.py runs/cmnist/1pct runs/cmnist/5pct --stages lff disent --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from diffinject.cli import main as cli_main
from diffinject.measures.metrics import (
    SELECTION_MARGIN_SE,
    PseudoGroupAccuracy,
    keep_last_epoch,
    pseudo_balanced_se,
    selection_fallback,
)
from diffinject.stages.bias_ensemble import CSV_NAME, JSON_NAME
from diffinject.stages.weights import load_classifier_checkpoint

STAGES = ("vanilla", "lff", "disent", "lff_be", "disent_be", "debias")
RULES = ("val/acc", "pseudo (hard)", "pseudo (soft)", "stage rule", "last epoch", "oracle")


class EpochRecorder(Callback):
    """Per validation epoch: which validation images are right, and the test accuracy."""

    def __init__(self, bias_checkpoint: str) -> None:
        self.bias_checkpoint = bias_checkpoint
        self.rows: list[dict[str, Any]] = []
        self.val_labels = torch.zeros(0, dtype=torch.long)
        self.bias_logits = torch.zeros(0)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bias_net = load_classifier_checkpoint(self.bias_checkpoint, {})[0].eval()
        trainer.datamodule.setup("test")
        with torch.no_grad():
            batches = list(trainer.datamodule.val_dataloader())
            self.bias_logits = torch.cat([bias_net(b["image"]) for b in batches])
        self.val_labels = torch.cat([b["label"] for b in batches])

    @torch.no_grad()
    def _right(self, model: torch.nn.Module, loader: Any) -> torch.Tensor:
        right = [model(b["image"].to(model.device)).argmax(1).cpu() == b["label"] for b in loader]
        return torch.cat(right)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        training = pl_module.training
        pl_module.eval()
        val = self._right(pl_module, trainer.datamodule.val_dataloader())
        test = self._right(pl_module, trainer.datamodule.test_dataloader())
        pl_module.train(training)
        self.rows.append(
            {"epoch": trainer.current_epoch, "val_right": val, "test/acc": float(test.float().mean())}
        )


def pseudo_scores(right: torch.Tensor, labels: torch.Tensor, bias_logits: torch.Tensor) -> dict[str, float]:
    """Hard and soft pseudo-group balanced accuracy of one epoch, and the soft conflicting group's size."""
    preds = torch.where(right, labels, (labels + 1) % bias_logits.shape[1])  # right/wrong is all that counts
    hard, soft = PseudoGroupAccuracy(), PseudoGroupAccuracy()
    hard.update(preds, labels, bias_logits.argmax(1))
    soft.update(preds, labels, bias_logits)
    groups = soft.compute_groups()
    return {
        "pseudo (hard)": float(hard.compute()),
        "pseudo (soft)": float(groups["balanced"]),
        "size": min(float(groups["conflicting_size"]), float(groups["wrong_count"])),  # as the stages
        "se": pseudo_balanced_se(groups),
    }


def pick(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The first epoch with the highest `key` (as ModelCheckpoint keeps the first of equal scores)."""
    return max(rows, key=lambda row: (row[key], -row["epoch"]))


def apply_rules(
    rows: list[dict[str, Any]], min_group: float, margin_se: float = SELECTION_MARGIN_SE
) -> dict[str, dict[str, Any]]:
    """Every rule's selected epoch, with its test accuracy and distances to the last and the oracle epoch.

    "stage rule" is what the classifier stages do: the last epoch when the pseudo-conflicting group is too
    small (`selection_fallback`) or when the best soft score is within `margin_se` standard errors of the
    last epoch's (`keep_last_epoch`), else the best soft score."""
    last, oracle = rows[-1], pick(rows, "test/acc")
    fallback = selection_fallback(rows[0]["size"], min_group)
    best = pick(rows, "pseudo (soft)")
    within = keep_last_epoch(best["pseudo (soft)"], last["pseudo (soft)"], last.get("se", 0.0), margin_se)
    chosen = {
        "val/acc": pick(rows, "val/acc"),
        "pseudo (hard)": pick(rows, "pseudo (hard)"),
        "pseudo (soft)": best,
        "stage rule": last if fallback or within else best,
        "last epoch": last,
        "oracle": oracle,
    }
    return {
        rule: {
            "epoch": row["epoch"],
            "test/acc": row["test/acc"],
            "epochs_from_last": row["epoch"] - last["epoch"],
            "acc_minus_last": row["test/acc"] - last["test/acc"],
            "epochs_from_oracle": row["epoch"] - oracle["epoch"],
            "acc_minus_oracle": row["test/acc"] - oracle["test/acc"],
        }
        for rule, row in chosen.items()
    }


def record(seed_dir: Path, stage: str, seed: int) -> tuple[list[dict[str, Any]], float]:
    """Refit one stage with the recorder; per-epoch scores and the stage's selection_min_group."""
    config = yaml.safe_load((seed_dir / stage / "pipeline_config.yaml").read_text())
    init = config["model"].get("init_args", {})
    bias = init.get("selection_bias") or str(seed_dir / "bias" / "checkpoints" / "best.ckpt")
    min_group = float(init.get("selection_min_group", 16.0))
    # by class path, as a user's callback would be given (this folder is on sys.path when run as a script)
    recorder_spec = {"class_path": "selection_rules.EpochRecorder", "init_args": {"bias_checkpoint": bias}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in (CSV_NAME, JSON_NAME):  # reuse a BiasEnsemble committee instead of retraining it
            if (seed_dir / stage / name).is_file():
                shutil.copy(seed_dir / stage / name, Path(scratch) / name)
        config["trainer"].update(default_root_dir=scratch, logger=False, enable_progress_bar=False)
        config["trainer"]["callbacks"] = [recorder_spec]
        file = Path(scratch) / "config.yaml"
        file.write_text(yaml.safe_dump(config))
        cli = cli_main(["fit", "--config", str(file), "--seed_everything", str(seed)])
    recorder = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EpochRecorder")
    rows = []
    for row in recorder.rows:
        right = row.pop("val_right")
        scores = pseudo_scores(right, recorder.val_labels, recorder.bias_logits)
        rows.append({**row, "val/acc": float(right.float().mean()), **scores})
    return rows, min_group


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: per run and rule, the selected epoch and test accuracy (Δ to last / oracle) in points."""
    lines = ["| run | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
    for result in results:
        cells = []
        for rule in RULES:
            r = result["rules"][rule]
            cell = f"ep {r['epoch']}: {100 * r['test/acc']:.1f}"
            if rule not in ("last epoch", "oracle"):
                cell += f" ({100 * r['acc_minus_last']:+.1f} / {100 * r['acc_minus_oracle']:+.1f})"
            cells.append(cell)
        size = result["pseudo_conflicting_size"]
        run = f"{result['root']} {result['stage']} s{result['seed']} (n={size:.1f})"
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    note = "(Δ last / Δ oracle in points; n = effective pseudo-conflicting validation images)"
    return "\n".join(lines) + "\n" + note + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="pipeline run roots, e.g. runs/cmnist/1pct runs/cmnist/5pct")
    parser.add_argument("--stages", nargs="+", default=["lff"], choices=STAGES)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--min-group", type=float, default=None, help="default: each stage's own option")
    parser.add_argument("--output", default=None, help="also write every result (with per-epoch rows) here")
    args = parser.parse_args()
    results = []
    for root in args.roots:
        for stage in args.stages:
            for seed in args.seeds:
                rows, min_group = record(Path(root) / f"seed{seed}", stage, seed)
                min_group = args.min_group if args.min_group is not None else min_group
                result = {
                    "root": root, "stage": stage, "seed": seed, "epochs": len(rows), "min_group": min_group,
                    "pseudo_conflicting_size": rows[0]["size"], "rules": apply_rules(rows, min_group),
                }  # fmt: skip
                for rule, chosen in result["rules"].items():
                    print(json.dumps({"root": root, "stage": stage, "seed": seed, "rule": rule, **chosen}))
                results.append({**result, "per_epoch": rows})
    print(table(results), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
