"""(content, style) pairs for the injection stage, and the predict DataModule that serves them.

Content = a top-K image (likely bias-conflicting, from the bias stage's `topk.csv`), style = another
training image; N_syn = ratio × |train| samples (DESIGN.md "Math", "Pairing"). Sample i draws its pair
and its noise seed from `numpy.random.default_rng([seed, i])` alone, so a sample is the same whatever the
batch size, the number of devices, or which samples a resumed run still has to make.

Top-K file: `topk.csv` (index,label,loss,rank,bias; bias is read only for reporting). Each row is checked:
indices >= 0 and inside the training split, finite losses, and labels equal to the dataset's (a file made for
another dataset, ratio or seed is an error naming it, not a silent mismatch). The sibling
`topk_scores.csv` (every training image's loss, written by `TopKWriter(write_scores=True)`) is used
when present and needed: for `style_pool="aligned_guess"`, for `k_source="global"`, and when `k` exceeds
the rows `topk.csv` holds per class.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from diffinject.data.base import BiasedDataModule

log = logging.getLogger("diffinject.data")

KSource = Literal["per_class", "global"]
StylePool = Literal["rest", "aligned_guess", "all"]
LabelFrom = Literal["content", "style"]
TOPK_COLUMNS = ("index", "label", "loss")
# p_y > 1/2 ⇔ CE < ln 2: the biased classifier is confident and right, the image most likely follows the bias.
ALIGNED_GUESS_MAX_LOSS = math.log(2.0)


@dataclass(frozen=True)
class Scores:
    """Per-image biased-classifier losses: dataset indices, labels, CE losses (from a top-K CSV)."""

    indices: np.ndarray
    labels: np.ndarray
    losses: np.ndarray
    path: Path


def topk_stage_hint(path: Path) -> str:
    """The command that produces a top-K file, with the dataset guessed from runs/{dataset}/{pct}/bias/."""
    parts = path.parts
    dataset = parts[-4] if len(parts) >= 4 and parts[-2] == "bias" else "<dataset>"
    return f"diffinject predict --config configs/{dataset}/topk.yaml"


def read_scores(path: str | Path) -> Scores:
    """Read index,label,loss from a top-K CSV; clear errors naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"top-K file {path} not found: the top-K stage writes it, run `{topk_stage_hint(path)}` first"
        )
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        missing = [c for c in TOPK_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"top-K file {path} lacks column(s) {missing}; header {header}, expected index,label,loss"
            )
        reader.fieldnames = header
        rows = []
        for line, row in enumerate(reader, start=2):
            try:
                index, label, loss = int(row["index"]), int(row["label"]), float(row["loss"])
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, line {line}: expected integer index/label and a float loss"
                ) from None
            if index < 0:
                raise ValueError(f"{path}, line {line}: index {index} is negative; indices are 0, 1, …")
            if not math.isfinite(loss):
                raise ValueError(
                    f"{path}, line {line}: loss {row['loss'].strip()} is not a finite number (a diverged "
                    f"biased classifier?); rerun the top-K stage"
                )
            rows.append((index, label, loss))
    if not rows:
        raise ValueError(f"top-K file {path} has no rows")
    indices, labels, losses = (np.array(col) for col in zip(*rows, strict=True))
    if len(np.unique(indices)) != len(indices):
        raise ValueError(f"top-K file {path} lists an index twice")
    return Scores(indices.astype(np.int64), labels.astype(np.int64), losses.astype(np.float64), path)


def check_scores(scores: Scores, labels: np.ndarray) -> None:
    """Every row must name a training image (0 <= index < |train|) and carry that image's label; otherwise the
    file was made for another dataset, ratio or seed, and pairs built from it would be meaningless."""
    num_train = len(labels)
    if scores.indices.max() >= num_train:
        raise ValueError(
            f"{scores.path} names index {scores.indices.max()} but the training split has {num_train} "
            "images: was it made for another dataset or split?"
        )
    wrong = np.flatnonzero(labels[scores.indices] != scores.labels)
    if wrong.size:
        first, theirs = int(scores.indices[wrong[0]]), int(scores.labels[wrong[0]])
        raise ValueError(
            f"{scores.path}: {wrong.size} row(s) disagree with the training split's labels, e.g. index "
            f"{first}: label {theirs} in the file, {int(labels[first])} in the data; was "
            f"it made for another dataset, ratio or seed? Rerun `{topk_stage_hint(scores.path)}`"
        )


def _highest(indices: np.ndarray, losses: np.ndarray, k: int) -> np.ndarray:
    order = np.lexsort((indices, -losses))  # highest loss first, ties → lower index
    return indices[order[:k]]


def select_content_pool(scores: Scores, k: int, k_source: KSource) -> np.ndarray:
    """Dataset indices of the content pool, sorted: k per class (per_class) or k in total (global)."""
    if k < 1:
        raise ValueError(f"K must be >= 1, got {k}")
    if k_source == "global":
        if len(scores.indices) < k:
            raise ValueError(f"{scores.path} holds {len(scores.indices)} rows, fewer than K={k}")
        return np.sort(_highest(scores.indices, scores.losses, k))
    if k_source != "per_class":
        raise ValueError(f"k_source must be 'per_class' or 'global', got {k_source!r}")
    pool = []
    for label in np.unique(scores.labels):
        in_class = scores.labels == label
        if in_class.sum() < k:
            raise ValueError(
                f"{scores.path} holds {int(in_class.sum())} rows of class {label}, fewer than K={k}; "
                f"rerun the top-K stage with k >= {k} (its topk_scores.csv would also do)"
            )
        pool.append(_highest(scores.indices[in_class], scores.losses[in_class], k))
    return np.sort(np.concatenate(pool))


def select_style_pool(
    num_train: int, content_pool: np.ndarray, style_pool: StylePool, scores: Scores | None
) -> np.ndarray:
    """Dataset indices styles are drawn from: all images, all but the content pool, or the confident ones."""
    everything = np.arange(num_train)
    if style_pool == "all":
        return everything
    rest = np.setdiff1d(everything, content_pool)
    if style_pool == "rest":
        return rest
    if style_pool != "aligned_guess":
        raise ValueError(f"style_pool must be 'rest', 'aligned_guess' or 'all', got {style_pool!r}")
    if scores is None or len(scores.indices) < num_train:
        raise ValueError(
            "style_pool='aligned_guess' needs every training image's loss (topk_scores.csv next to topk.csv, "
            "written by TopKWriter(write_scores=True))"
        )
    confident = scores.indices[scores.losses < ALIGNED_GUESS_MAX_LOSS]
    return np.intersect1d(rest, confident)


@dataclass(frozen=True)
class PairPlan:
    """The whole pairing: sample i uses content[i], style[i] and noise seed noise_seed[i]."""

    content: np.ndarray
    style: np.ndarray
    noise_seed: np.ndarray

    def __len__(self) -> int:
        return len(self.content)


def plan_pairs(num_samples: int, content_pool: np.ndarray, style_pool: np.ndarray, seed: int) -> PairPlan:
    """Draw every sample's (content, style, noise seed) from its own generator seeded by (seed, i)."""
    if len(content_pool) == 0 or len(style_pool) == 0:
        raise ValueError(
            f"cannot pair: content pool has {len(content_pool)} and style pool {len(style_pool)} images"
        )
    content = np.empty(num_samples, dtype=np.int64)
    style = np.empty(num_samples, dtype=np.int64)
    noise_seed = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        rng = np.random.default_rng([seed, i])
        content[i] = content_pool[rng.integers(len(content_pool))]
        style[i] = style_pool[rng.integers(len(style_pool))]
        noise_seed[i] = rng.integers(0, 2**62)
    return PairPlan(content, style, noise_seed)


def _labels_and_biases(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    labels, biases = getattr(dataset, "labels", None), getattr(dataset, "biases", None)
    if labels is not None and biases is not None:
        return np.asarray(labels, dtype=np.int64), np.asarray(biases, dtype=np.int64)
    items = [dataset[i] for i in range(len(dataset))]
    return (
        np.array([int(it["label"]) for it in items], dtype=np.int64),
        np.array([int(it.get("bias", -1)) for it in items], dtype=np.int64),
    )


class PairsDataset(Dataset):
    """Sample i → {index, content/style images, indices, labels, biases, label, noise_seed}."""

    def __init__(
        self,
        source: Dataset,
        plan: PairPlan,
        labels: np.ndarray,
        biases: np.ndarray,
        label_from: LabelFrom,
        sample_ids: Iterable[int] | None = None,
    ) -> None:
        self.source = source
        self.plan = plan
        self.labels = labels
        self.biases = biases
        self.label_from = label_from
        self.sample_ids = (
            np.arange(len(plan)) if sample_ids is None else np.asarray(list(sample_ids), dtype=np.int64)
        )

    def __len__(self) -> int:
        return len(self.sample_ids)

    def sample_info(self, i: int) -> dict[str, int]:
        """Everything about sample i but the images (what its manifest row records), from the plan alone."""
        c, s = int(self.plan.content[i]), int(self.plan.style[i])
        content_label, style_label = int(self.labels[c]), int(self.labels[s])
        return {
            "index": i,
            "content_index": c,
            "style_index": s,
            "label": content_label if self.label_from == "content" else style_label,
            "content_label": content_label,
            "style_label": style_label,
            "content_bias": int(self.biases[c]),
            "style_bias": int(self.biases[s]),
            "noise_seed": int(self.plan.noise_seed[i]),
        }

    def __getitem__(self, position: int) -> dict:
        info = self.sample_info(int(self.sample_ids[position]))
        content, style = info["content_index"], info["style_index"]
        return {
            **info,
            "content_image": self.source[content]["image"],
            "style_image": self.source[style]["image"],
        }


class InjectionPairsDataModule(LightningDataModule):
    """Predict DataModule of the injection stage: serves (content, style) pairs built from `data`.

    Args:
        data: the source data module (its `train_eval_dataset`: training split, no augmentation, index order).
        topk: the bias stage's top-K CSV (runs/{dataset}/{pct}/bias/topk.csv).
        ratio: N_syn = int(ratio × |train|) synthetic samples (reference: 0.1).
        k_source: content pool = the k highest-loss images of each class ("per_class", the reference) or the
            k highest overall ("global").
        k: see k_source.
        style_pool: "rest" (every training image outside the content pool), "aligned_guess" (those the biased
            classifier gets right with p_y > 1/2, a label-free stand-in for the reference's bias-aligned pool)
            or "all".
        label_from: synthetic label = the content's label ("content", default) or the style's.
        seed: pairing seed; sample i uses numpy `default_rng([seed, i])`.
        batch_size / num_workers: predict loader settings.
    """

    def __init__(
        self,
        data: BiasedDataModule,
        topk: str,
        ratio: float = 0.1,
        k_source: KSource = "per_class",
        k: int = 10,
        style_pool: StylePool = "rest",
        label_from: LabelFrom = "content",
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0 (N_syn = ratio × |train|), got {ratio}")
        if k < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        if k_source not in ("per_class", "global"):
            raise ValueError(f"k_source must be 'per_class' or 'global', got {k_source!r}")
        if style_pool not in ("rest", "aligned_guess", "all"):
            raise ValueError(f"style_pool must be 'rest', 'aligned_guess' or 'all', got {style_pool!r}")
        if label_from not in ("content", "style"):
            raise ValueError(f"label_from must be 'content' or 'style', got {label_from!r}")
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.topk_path = Path(topk)
        if not self.topk_path.is_file():
            raise FileNotFoundError(
                f"top-K file {self.topk_path} not found: it is written by the top-K stage, run "
                f"`{topk_stage_hint(self.topk_path)}` first"
            )
        self.data = data
        self.ratio = ratio
        self.k_source: KSource = k_source
        self.k = k
        self.style_pool: StylePool = style_pool
        self.label_from: LabelFrom = label_from
        self.seed = seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        # what configs and the writer read without setup
        self.name, self.pct = data.name, data.pct
        self.num_classes, self.image_size, self.channels = data.num_classes, data.image_size, data.channels
        self.plan: PairPlan | None = None
        self.pairs: PairsDataset | None = None
        self.content_pool: np.ndarray | None = None
        self.style_indices: np.ndarray | None = None
        self.done: set[int] = set()

    @property
    def scores_path(self) -> Path:
        return self.topk_path.with_name(f"{self.topk_path.stem}_scores.csv")

    def _scores(self, labels: np.ndarray) -> tuple[Scores, Scores | None]:
        topk = read_scores(self.topk_path)
        full = read_scores(self.scores_path) if self.scores_path.is_file() else None
        per_class_short = self.k_source == "per_class" and any(
            (topk.labels == label).sum() < self.k for label in np.unique(topk.labels)
        )
        needs_full = self.k_source == "global" or per_class_short
        for table in (topk, full):
            if table is not None:
                check_scores(table, labels)
        return (full if (needs_full and full is not None) else topk), full

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.pairs is not None:
            return
        self.data.setup("fit")
        source = self.data.train_eval_dataset
        if source is None:
            raise RuntimeError(f"{type(self.data).__name__}.setup('fit') did not build train_eval_dataset")
        num_train = len(source)
        labels, biases = _labels_and_biases(source)
        selection, full = self._scores(labels)
        self.content_pool = select_content_pool(selection, self.k, self.k_source)
        self.style_indices = select_style_pool(num_train, self.content_pool, self.style_pool, full)
        num_samples = int(self.ratio * num_train)
        if num_samples < 1:
            raise ValueError(f"ratio={self.ratio} × {num_train} training images gives no synthetic sample")
        self.plan = plan_pairs(num_samples, self.content_pool, self.style_indices, self.seed)
        self.pairs = PairsDataset(source, self.plan, labels, biases, self.label_from)
        log.info(
            "injection pairs: %d samples, content pool %d (%s, K=%d), style pool %d (%s), label from %s",
            num_samples, len(self.content_pool), self.k_source, self.k,
            len(self.style_indices), self.style_pool, self.label_from,
        )  # fmt: skip

    def num_samples(self) -> int:
        if self.plan is None:
            raise RuntimeError("InjectionPairsDataModule: call setup() first")
        return len(self.plan)

    def sample_info(self, i: int) -> dict[str, int]:
        """Sample i's pair, labels and biases (no images): lets the writer rebuild manifest rows."""
        if self.pairs is None:
            raise RuntimeError("InjectionPairsDataModule: call setup() first")
        return self.pairs.sample_info(i)

    def skip_samples(self, done: Iterable[int]) -> None:
        """Leave these sample indices out of the predict loader (already written by an earlier run)."""
        self.done = {int(i) for i in done}

    def predict_dataloader(self) -> DataLoader:
        if self.pairs is None:
            raise RuntimeError("InjectionPairsDataModule: call setup('predict') first")
        todo = [i for i in range(len(self.pairs.plan)) if i not in self.done]
        dataset = PairsDataset(
            self.pairs.source, self.pairs.plan, self.pairs.labels, self.pairs.biases, self.label_from, todo
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
