"""Top-K extraction: keep the training images the biased classifier finds hardest (likely bias-conflicting).

`TopKWriter` collects `BiasClassifier.predict_step` outputs (index, label, bias, CE loss). Every rank writes
its own shard beside the output; after a barrier rank 0 merges the shards (deduplicated by dataset index, so
it does not matter how the sampler split the data), selects the top-K and writes, atomically:
  - `topk.csv`: index,label,loss,rank,bias (rank 1..K within class when per_class, else global; bias is an
    evaluation-only column, -1 when unknown);
  - `topk_scores.csv` (optional): every scored item with the same columns, rank within class / globally;
  - `topk_summary.json`: K, counts and, when bias labels exist, the top-K precision (fraction conflicting).
The selection itself is the pure function `select_topk`. Shards are files beside the output, so a multi-node
run needs that folder on a shared filesystem (as the checkpoints do).

`k_source="be"`: the contents come from a BiasEnsemble committee instead of the single GCE model
(`stages/bias_ensemble.py`, trained at the start of the run or read from `bias_ensemble.csv` beside the
output): the images the committee does *not* flag as bias-aligned, ranked by the committee's mean CE, K per
class; a class with fewer than K unflagged images is filled with its flagged ones of highest committee loss
(counted as `num_flagged_selected`). Same file format, `loss` = committee loss, so the inject stage is
unchanged; the summary also gives the GCE top-K's precision (`gce_precision`) and the committee's own.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from diffinject.nets import build_classifier
from diffinject.stages.bias_ensemble import EnsembleOptions, ensure_committee, read_committee

K_SOURCES = ("gce", "be")
COLUMNS = ("index", "label", "loss", "rank", "bias")
_KEYS = ("index", "label", "bias", "loss")


def rank_scores(
    index: torch.Tensor,
    label: torch.Tensor,
    loss: torch.Tensor,
    per_class: bool = True,
    demote: torch.Tensor | None = None,
) -> torch.Tensor:
    """1-based rank by descending loss (within each class if per_class); ties → lower index first.

    `demote` (bool per item, e.g. BiasEnsemble's flagged images) ranks those items after all the others.
    """
    losses, indices, labels = loss.tolist(), index.tolist(), label.tolist()
    last = demote.tolist() if demote is not None else [False] * len(indices)
    order = sorted(range(len(indices)), key=lambda i: (bool(last[i]), -losses[i], indices[i]))
    ranks = torch.zeros(len(indices), dtype=torch.long)
    counters: dict[int, int] = {}
    for position in order:
        group = int(labels[position]) if per_class else 0
        counters[group] = counters.get(group, 0) + 1
        ranks[position] = counters[group]
    return ranks


def select_topk(scores: dict[str, torch.Tensor], k: int, per_class: bool = True) -> list[dict[str, Any]]:
    """Rows (dicts with COLUMNS) of the K highest-loss items per class (or overall), by (label, rank).

    With a "flagged" entry in `scores` (k_source be), unflagged items come first, flagged ones only fill up.
    """
    if k < 1:
        raise ValueError(f"top-K needs k >= 1, got {k}")
    ranks = rank_scores(scores["index"], scores["label"], scores["loss"], per_class, scores.get("flagged"))
    rows = [row for row in _rows(scores, ranks) if row["rank"] <= k]
    return sorted(rows, key=lambda r: (r["label"], r["rank"]) if per_class else (r["rank"],))


def topk_precision(rows: Sequence[dict[str, Any]]) -> float | None:
    """Fraction of selected items truly bias-conflicting (label != bias), over items with known bias."""
    known = [r for r in rows if r["bias"] >= 0]
    if not known:
        return None
    return sum(r["label"] != r["bias"] for r in known) / len(known)


def conflict_stats(
    scores: dict[str, torch.Tensor], rows: Sequence[dict[str, Any]], k: int, per_class: bool = True
) -> dict[str, float | int | None]:
    """Evaluation of a selection against bias labels (None without any): how many conflicting items exist,
    the recall of the selection, and the best precision any selection of this size could reach (per-class
    top-K cannot be more conflicting than min(K, conflicting items of the class) per class)."""
    known = scores["bias"] >= 0
    if not bool(known.any()):
        return {"num_conflicting_scored": None, "recall": None, "max_precision": None}
    conflicting = known & (scores["label"] != scores["bias"])
    total = int(conflicting.sum())
    selected = sum(r["bias"] >= 0 and r["label"] != r["bias"] for r in rows)
    known_selected = sum(r["bias"] >= 0 for r in rows)
    if per_class:
        labels = scores["label"][conflicting].tolist()
        best = sum(min(k, labels.count(c)) for c in set(labels))
    else:
        best = min(k, total)
    return {
        "num_conflicting_scored": total,
        "recall": selected / total if total else None,
        "max_precision": best / known_selected if known_selected else None,
    }


def _rows(scores: dict[str, torch.Tensor], ranks: torch.Tensor) -> list[dict[str, Any]]:
    columns = {key: scores[key].tolist() for key in _KEYS}
    return [
        {
            "index": int(columns["index"][i]),
            "label": int(columns["label"][i]),
            "loss": float(columns["loss"][i]),
            "rank": int(rank),
            "bias": int(columns["bias"][i]),
        }
        for i, rank in enumerate(ranks.tolist())
    ]


def write_rows_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """CSV with COLUMNS, written to a temp file then renamed (a reader never sees a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "loss": f"{row['loss']:.6g}"})
    os.replace(tmp, path)


class TopKWriter(BasePredictionWriter):
    """Write the top-K highest-CE training items of a `BiasClassifier` predict run.

    Args:
        output: path of the top-K CSV (e.g. runs/cmnist/1pct/bias/topk.csv).
        k: items per class (per_class) or in total.
        per_class: rank within each ground-truth class (DiffInject's default, K = 10) or globally.
        write_scores: also write every item's score to `<stem>_scores.csv`.
        k_source: "gce" (the bias stage's GCE model, the paper) or "be" (a BiasEnsemble committee; see the
            module docstring). With "be", set k to the inject stage's K: that stage re-ranks
            `topk_scores.csv` by loss alone when its K exceeds the rows per class here.
        bias_ensemble: the committee's options (`EnsembleOptions` keys) for k_source "be"; lr defaults to
            the scoring model's.
    """

    def __init__(
        self,
        output: str,
        k: int = 10,
        per_class: bool = True,
        write_scores: bool = True,
        k_source: str = "gce",
        bias_ensemble: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        if k < 1:
            raise ValueError(f"TopKWriter k must be >= 1, got {k}")
        if k_source not in K_SOURCES:
            raise ValueError(f"TopKWriter k_source must be one of {K_SOURCES}, got {k_source!r}")
        self.k_source = k_source
        self.ensemble = EnsembleOptions.parse(bias_ensemble or {}) if k_source == "be" else None
        self.output = Path(output)
        self.k = k
        self.per_class = per_class
        self.write_scores = write_scores
        self._chunks: list[dict[str, torch.Tensor]] = []

    def _shard_path(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.stem}.shard{rank}.pt")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._chunks = []
        if self.ensemble is not None:
            h = pl_module.hparams

            def make_net() -> torch.nn.Module:
                return build_classifier(h.arch, h.num_classes, h.in_channels, h.image_size, h.pretrained)

            devices = [pl_module.device] if pl_module.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                ensure_committee(
                    self.output.parent, self.ensemble, h.get("lr", 1e-3), make_net,
                    trainer.datamodule, pl_module.device, trainer,
                )  # fmt: skip

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        missing = [key for key in _KEYS if key not in prediction]
        if missing:
            raise KeyError(f"TopKWriter needs predict_step to return {_KEYS}; missing {missing}")
        self._chunks.append({key: prediction[key].detach().reshape(-1).cpu() for key in _KEYS})

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        local = {
            key: torch.cat([c[key] for c in self._chunks]) if self._chunks else torch.zeros(0)
            for key in _KEYS
        }
        self._shard_path(trainer.global_rank).parent.mkdir(parents=True, exist_ok=True)
        torch.save(local, self._shard_path(trainer.global_rank))
        trainer.strategy.barrier("topk_shards_written")
        if trainer.is_global_zero:
            self._merge_and_write(trainer, pl_module)
        trainer.strategy.barrier("topk_written")
        self._chunks = []

    def _merge_and_write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        shards = [self._shard_path(rank) for rank in range(trainer.world_size)]
        parts = [torch.load(path, map_location="cpu", weights_only=True) for path in shards]
        merged = {key: torch.cat([p[key] for p in parts]) for key in _KEYS}
        # Deduplicate by dataset index (a padding sampler may score some items twice).
        order = torch.argsort(merged["index"], stable=True)
        merged = {key: value[order] for key, value in merged.items()}
        keep = torch.ones(len(order), dtype=torch.bool)
        if len(order) > 1:
            keep[1:] = merged["index"][1:] != merged["index"][:-1]
        scores = {key: value[keep] for key, value in merged.items()}
        gce_rows = select_topk(scores, self.k, self.per_class)
        extra: dict[str, Any] = {"k_source": self.k_source}
        if self.k_source == "be":
            scores, extra = self._committee_scores(scores, gce_rows)

        rows = select_topk(scores, self.k, self.per_class)
        write_rows_atomic(self.output, rows)
        if self.write_scores:
            ranks = rank_scores(
                scores["index"], scores["label"], scores["loss"], self.per_class, scores.get("flagged")
            )
            write_rows_atomic(self.output.with_name(f"{self.output.stem}_scores.csv"), _rows(scores, ranks))
        for path in shards:
            path.unlink(missing_ok=True)
        if self.k_source == "be":
            flagged = dict(zip(scores["index"].tolist(), scores["flagged"].tolist(), strict=True))
            extra["num_flagged_selected"] = sum(bool(flagged[r["index"]]) for r in rows)
        self._summarise(trainer, pl_module, scores, rows, extra)

    def _committee_scores(
        self, scores: dict[str, torch.Tensor], gce_rows: list[dict[str, Any]]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The scored items with the committee's loss and flags in place of the GCE model's CE."""
        loaded = read_committee(self.output.parent)
        if loaded is None:
            raise RuntimeError(f"k_source=be: no committee in {self.output.parent} (bias_ensemble.csv)")
        committee, info = loaded
        position = {i: p for p, i in enumerate(committee.index.tolist())}
        missing = [i for i in scores["index"].tolist() if i not in position]
        if missing:
            raise ValueError(f"bias_ensemble.csv lacks scored indices {missing[:5]}: delete it to retrain")
        at = torch.tensor([position[i] for i in scores["index"].tolist()], dtype=torch.long)
        be_scores = {**scores, "loss": committee.loss[at], "flagged": committee.flagged[at]}
        extra = {
            "k_source": "be",
            "gce_precision": topk_precision(gce_rows),
            "bias_ensemble": info,
        }
        return be_scores, extra

    def _summarise(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        scores: dict[str, torch.Tensor],
        rows: list[dict],
        extra: dict[str, Any],
    ) -> None:
        counts: dict[int, int] = {}
        for row in rows:
            counts[row["label"]] = counts.get(row["label"], 0) + 1
        short = {label: n for label, n in counts.items() if self.per_class and n < self.k}
        if short:
            rank_zero_warn(f"top-K: classes with fewer than k={self.k} items: {short}")
        known = scores["bias"] >= 0
        base_rate = (
            float((scores["label"][known] != scores["bias"][known]).float().mean()) if known.any() else None
        )
        precision = topk_precision(rows)
        weights = pl_module.hparams.get("weights")
        summary = {
            "k": self.k,
            "per_class": self.per_class,
            "num_scored": int(len(scores["index"])),
            "num_selected": len(rows),
            "per_class_counts": {str(label): n for label, n in sorted(counts.items())},
            "precision": precision,
            "num_conflicting_selected": sum(r["bias"] >= 0 and r["label"] != r["bias"] for r in rows),
            "conflicting_rate_in_scored": base_rate,
            **conflict_stats(scores, rows, self.k, self.per_class),
            "weights": weights,
            "output": str(self.output),
            **extra,
        }
        path = self.output.with_name(f"{self.output.stem}_summary.json")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, path)
        message = f"top-K ({self.k_source}): wrote {len(rows)} rows to {self.output}"
        if precision is not None:
            message += (
                f"; precision (fraction bias-conflicting) = {precision:.3f} (base rate {base_rate:.4f})"
            )
            if trainer.logger is not None:
                trainer.logger.log_metrics({"topk/precision": precision}, step=0)
        print(message, flush=True)  # rank 0 only: called from _merge_and_write
