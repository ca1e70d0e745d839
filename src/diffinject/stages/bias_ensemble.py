"""BiasEnsemble (Lee et al. 2022, "Revisiting the Importance of Amplifying Bias for Debiasing").

A committee of M briefly trained GCE models votes on every training image: it is flagged *bias-aligned* when
at least `agreement` members give its label a probability above `threshold`. LfF+BE / DisEnt+BE then train
their bias branch on the flagged images only, so the bias model is not pulled towards the few
bias-conflicting images; DiffInject's top-K can take its contents from the images the committee does *not*
flag (`TopKWriter(k_source="be")`).

Reference (kakaoenterprise/BiasEnsemble @13c01f4): `train.py` defaults `num_bias_models` 5,
`biased_model_train_iter` 1,000, `biased_model_softmax_threshold` 0.99, `agreement` 3; `learner.py`
`pretrain_b_ensemble_best`: each member is a fresh network trained with GCE (q 0.7) and Adam at the run's lr,
keeping the copy with the best validation accuracy (checked every `valid_freq` = 500 steps), then scores the
training set in order without shuffling; `train_lff_be` / `train_disent_be` retrain f_B with plain CE on the
flagged images (`bias_loss: ce` here). We check validation every `check_every` steps counted from 1 and
after the last step (the reference checks at steps 0, 500, …, i.e. after 1 update and never at the end).

Bias labels are read only for the committee's precision/recall in `bias_ensemble.json`: never for training or
selection. The pure pieces (`committee_vote`, `committee_metrics`) are unit-tested; `ensure_committee` is
what a stage calls, caching the result in its folder so a resumed run does not retrain the committee.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from diffinject.stages.losses import check_gce_q, gce_loss

CSV_NAME, JSON_NAME = "bias_ensemble.csv", "bias_ensemble.json"
CSV_COLUMNS = ("index", "label", "votes", "flagged", "loss")
Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class EnsembleOptions:
    """The committee's settings (a `bias_ensemble:` mapping in a config; every key optional).

    Args:
        num_models: committee size M (reference 5).
        steps: GCE training steps per member (reference 1,000; scale with the training-set size).
        threshold: a member votes "aligned" when p(label | image) > threshold (0.99).
        agreement: votes needed to flag an image (3 of 5).
        q: GCE exponent of the members (0.7).
        lr: members' Adam learning rate; None = the stage's lr (as the reference).
        check_every: validation accuracy every this many steps (and after the last); the best copy votes.
            0 = the last copy votes.
        bias_loss: how the stage's bias branch trains on the flagged images: "ce" (the reference) or "gce".
    """

    num_models: int = 5
    steps: int = 1000
    threshold: float = 0.99
    agreement: int = 3
    q: float = 0.7
    lr: float | None = None
    check_every: int = 500
    bias_loss: str = "ce"

    def __post_init__(self) -> None:
        if self.num_models < 1 or self.steps < 1:
            raise ValueError(
                f"bias_ensemble needs num_models, steps >= 1, got {self.num_models}, {self.steps}"
            )
        if not 1 <= self.agreement <= self.num_models:
            raise ValueError(
                f"bias_ensemble agreement must be in [1, {self.num_models}], got {self.agreement}"
            )
        check_gce_q(self.q)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"bias_ensemble threshold must be in (0, 1), got {self.threshold}")
        if self.bias_loss not in ("ce", "gce"):
            raise ValueError(f"bias_ensemble bias_loss must be 'ce' or 'gce', got {self.bias_loss!r}")
        if self.check_every < 0:
            raise ValueError(f"bias_ensemble check_every must be >= 0, got {self.check_every}")

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> EnsembleOptions | None:
        """None stays None (no committee); unknown keys are an error naming the known ones."""
        if options is None:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown bias_ensemble option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(options))

    def committee_key(self, lr: float) -> dict[str, Any]:
        """What the committee's votes depend on (the cache is reused only when this matches)."""
        key = {k: v for k, v in asdict(self).items() if k != "bias_loss"}
        return {**key, "lr": float(self.lr if self.lr is not None else lr)}


@dataclass
class Committee:
    """Per training image (sorted by dataset index): the label, aligned votes, flag and mean committee CE."""

    index: torch.Tensor
    label: torch.Tensor
    votes: torch.Tensor
    flagged: torch.Tensor
    loss: torch.Tensor

    def flags_by_index(self, size: int) -> torch.Tensor:
        """A bool vector over dataset indices 0..size-1 (True = flagged bias-aligned)."""
        if len(self.index) and int(self.index.max()) >= size:
            raise ValueError(
                f"{CSV_NAME} names index {int(self.index.max())} but the training split has {size} images: "
                "was it made for another dataset or split? Delete it to retrain the committee"
            )
        out = torch.zeros(size, dtype=torch.bool)
        out[self.index] = self.flagged
        return out


# -- the pure pieces --------------------------------------------------------------------------------------
def committee_vote(
    prob_y: torch.Tensor, threshold: float = 0.99, agreement: int = 3
) -> tuple[torch.Tensor, ...]:
    """`prob_y`: M × N label probabilities → (votes per image, flagged = votes >= agreement)."""
    votes = (prob_y > threshold).sum(0)
    return votes, votes >= agreement


def committee_metrics(flagged: torch.Tensor, label: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
    """Flags against the bias labels (metrics only): precision/recall of "flagged = aligned", counts.

    Unknown bias (-1) is left out. `conflicting_unflagged_rate` is the share of unflagged images that are
    truly conflicting (what `k_source: be` picks contents from).
    """
    known = bias >= 0
    aligned = known & (label == bias)
    conflicting = known & (label != bias)
    flagged_known = flagged & known
    n_flag, n_aligned = int(flagged_known.sum()), int(aligned.sum())
    unflagged = known & ~flagged
    return {
        "num_images": int(len(flagged)),
        "num_flagged": int(flagged.sum()),
        "num_flagged_conflicting": int((flagged & conflicting).sum()),
        "num_conflicting": int(conflicting.sum()),
        "precision": int((flagged & aligned).sum()) / n_flag if n_flag else None,
        "recall": int((flagged & aligned).sum()) / n_aligned if n_aligned else None,
        "conflicting_unflagged_rate": (
            int((unflagged & conflicting).sum()) / int(unflagged.sum()) if int(unflagged.sum()) else None
        ),
    }


# -- training and scoring the members ----------------------------------------------------------------------
def _cycle(loader: Iterable[Batch]) -> Iterator[Batch]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("bias_ensemble: the training loader is empty")


@torch.no_grad()
def accuracy(net: nn.Module, loader: Iterable[Batch], device: torch.device) -> float:
    """Plain label accuracy (how the reference picks each member's best copy on the validation split)."""
    net.eval()
    correct = total = 0
    for batch in loader:
        pred = net(batch["image"].to(device)).argmax(1).cpu()
        correct += int((pred == batch["label"]).sum())
        total += len(pred)
    net.train()
    return correct / total if total else 0.0


def train_member(
    net: nn.Module,
    batches: Iterator[Batch],
    options: EnsembleOptions,
    lr: float,
    device: torch.device,
    evaluate: Callable[[nn.Module], float] | None = None,
) -> nn.Module:
    """GCE-train one member for `options.steps` steps; return the copy with the best `evaluate` score."""
    net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    best, best_score = None, -1.0
    for step in range(1, options.steps + 1):
        batch = next(batches)
        logits = net(batch["image"].to(device))
        loss = gce_loss(logits, batch["label"].to(device), q=options.q).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        check = options.check_every and (step % options.check_every == 0 or step == options.steps)
        if evaluate is not None and check:
            score = evaluate(net)
            if score > best_score:
                best, best_score = copy.deepcopy(net), score
    return (best if best is not None else net).eval()


@torch.no_grad()
def score_member(net: nn.Module, loader: Iterable[Batch], device: torch.device) -> dict[str, torch.Tensor]:
    """index, label, bias, p(label) and CE of every item of `loader` (the ordered training split)."""
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("index", "label", "bias", "prob", "loss")}
    for batch in loader:
        label = batch["label"].long()
        logits = net(batch["image"].to(device)).float().cpu()
        loss = F.cross_entropy(logits, label, reduction="none")
        parts["index"].append(batch["index"].long())
        parts["label"].append(label)
        parts["bias"].append(batch["bias"].long())
        parts["prob"].append(torch.exp(-loss))
        parts["loss"].append(loss)
    return {key: torch.cat(value) for key, value in parts.items()}


def run_committee(
    make_net: Callable[[], nn.Module],
    train_loader: Iterable[Batch],
    score_loader: Iterable[Batch],
    val_loader: Iterable[Batch] | None,
    options: EnsembleOptions,
    lr: float,
    device: torch.device,
) -> tuple[Committee, torch.Tensor]:
    """Train and score the M members; return the committee and the items' bias labels (metrics only)."""
    batches = _cycle(train_loader)
    evaluate = (lambda net: accuracy(net, val_loader, device)) if val_loader is not None else None
    probs, losses, first = [], [], None
    for member in range(options.num_models):
        net = train_member(make_net(), batches, options, lr, device, evaluate)
        scored = score_member(net, score_loader, device)
        first = first or scored
        if not torch.equal(scored["index"], first["index"]):
            raise RuntimeError("bias_ensemble: the scoring loader must visit the items in a fixed order")
        probs.append(scored["prob"])
        losses.append(scored["loss"])
        rank_zero_info(f"bias_ensemble: member {member + 1}/{options.num_models} trained")
    votes, flagged = committee_vote(torch.stack(probs), options.threshold, options.agreement)
    order = torch.argsort(first["index"])
    committee = Committee(
        first["index"][order], first["label"][order], votes[order], flagged[order],
        torch.stack(losses).mean(0)[order],
    )  # fmt: skip
    return committee, first["bias"][order]


# -- the cache files -------------------------------------------------------------------------------------
def write_committee(folder: Path, committee: Committee, key: dict[str, Any], metrics: dict[str, Any]) -> None:
    """`bias_ensemble.csv` (index,label,votes,flagged,loss) and `bias_ensemble.json`, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CSV_NAME}.tmp"
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS)
        for i, label, votes, flagged, loss in zip(
            *(t.tolist() for t in (committee.index, committee.label, committee.votes, committee.flagged)),
            committee.loss.tolist(),
            strict=True,
        ):
            writer.writerow([i, label, votes, int(flagged), f"{loss:.6g}"])
    os.replace(tmp, folder / CSV_NAME)
    tmp = folder / f".{JSON_NAME}.tmp"
    tmp.write_text(json.dumps({"options": key, "metrics": metrics}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / JSON_NAME)


def read_committee(
    folder: Path, key: dict[str, Any] | None = None
) -> tuple[Committee, dict[str, Any]] | None:
    """The cached committee and its json, or None when missing or made with other options than `key`."""
    csv_path, json_path = folder / CSV_NAME, folder / JSON_NAME
    if not (csv_path.is_file() and json_path.is_file()):
        return None
    info = json.loads(json_path.read_text())
    if key is not None and info.get("options") != key:
        return None
    with csv_path.open(newline="") as handle:
        rows = [(int(r["index"]), int(r["label"]), int(r["votes"]), int(r["flagged"]), float(r["loss"]))
                for r in csv.DictReader(handle)]  # fmt: skip
    if not rows:
        raise ValueError(f"{csv_path} has no rows; delete it to retrain the committee")
    index, label, votes, flagged, loss = zip(*rows, strict=True)
    committee = Committee(
        torch.tensor(index), torch.tensor(label), torch.tensor(votes), torch.tensor(flagged).bool(),
        torch.tensor(loss),
    )  # fmt: skip
    return committee, info


def ensure_committee(
    folder: str | os.PathLike[str],
    options: EnsembleOptions,
    lr: float,
    make_net: Callable[[], nn.Module],
    datamodule: Any,
    device: torch.device,
    trainer: Any,
) -> tuple[Committee, dict[str, Any]]:
    """Read the committee cached in `folder`, or (rank 0) train it, cache it, and share it over ranks.

    `datamodule`: its `train_dataloader()` trains the members, `predict_dataloader()` (the training split in
    index order, no augmentation) is scored, `val_dataloader()` picks each member's best copy.
    """
    folder = Path(folder)
    key = options.committee_key(lr)
    if trainer.is_global_zero and read_committee(folder, key) is None:
        if getattr(datamodule, "val_dataset", True) is None:
            datamodule.setup("validate")  # a predict run (top-K) has not built the validation split
        with torch.inference_mode(False), torch.enable_grad():  # also inside a predict run
            committee, bias = run_committee(
                make_net,
                datamodule.train_dataloader(),
                datamodule.predict_dataloader(),
                datamodule.val_dataloader() if options.check_every else None,
                options,
                key["lr"],
                device,
            )
        metrics = committee_metrics(committee.flagged, committee.label, bias)
        write_committee(folder, committee, key, metrics)
        rank_zero_info(
            f"bias_ensemble: flagged {metrics['num_flagged']}/{metrics['num_images']} training images as "
            f"bias-aligned (precision {metrics['precision']}, recall {metrics['recall']}; bias labels read "
            f"for these metrics only) → {folder / CSV_NAME}"
        )
    trainer.strategy.barrier("bias_ensemble_written")
    loaded = read_committee(folder, key)
    if loaded is None:
        raise RuntimeError(f"bias_ensemble: {folder / CSV_NAME} was not written (is the folder shared?)")
    return loaded
