"""The seed's top-K images as data for the GAN baselines (issue 22): a training loader and a sampling plan.

One home for both baselines: A²'s adaptation and AmpliBias's GAN train on `TopKImagesDataModule` (labels
served but unused by the GANs), AmpliBias samples with `GeneratorSamplesDataModule`.

Both modules wrap a dataset module (`data`, as `InjectionPairsDataModule` does, so the workflow's data-section
edits reach it) and read the bias stage's `topk.csv` (`pairs.read_scores`, checked against the training
split).
The pool is the file's rows (`k: null`, the default: e.g. the top-10 per class `configs/<dataset>/topk.yaml`
writes) or the k highest-loss rows per class / overall. Every class must have at least one row: a generator
whose pool lacks a class cannot make that class, and the nearest-image label rule could never give it.
Images come from `train_eval_dataset` (no augmentation; the GAN augments with DiffAugment itself).

- `TopKImagesDataModule` (fit): batches of top-K images drawn with replacement, `iterations_per_epoch`
  batches an epoch, so a run's length is the trainer's `max_steps` whatever K is.
- `GeneratorSamplesDataModule` (predict): N = int(ratio × |train|) samples (the inject stage's count, so the
  two synthetic sets have the same size); sample i's noise seed comes from `default_rng([seed, i])` alone,
  so a sample is the same whatever the batching or which samples a resumed run still has to make.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler

from diffinject.data.base import BiasedDataModule
from diffinject.data.pairs import (
    KSource,
    _labels_and_biases,
    check_scores,
    read_scores,
    select_content_pool,
    topk_stage_hint,
)

log = logging.getLogger("diffinject.data")


@dataclass(frozen=True)
class TopKPool:
    """The top-K images of one seed: training-split indices (sorted), labels, biases, [0, 1] images."""

    path: Path
    indices: np.ndarray
    labels: np.ndarray
    biases: np.ndarray
    images: torch.Tensor
    num_train: int

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()


def load_topk_pool(
    data: BiasedDataModule, topk: Path, k: int | None, k_source: KSource, num_classes: int
) -> TopKPool:
    """Read and check `topk`, select the pool and gather its images; errors name the top-K file."""
    data.setup("fit")
    source = data.train_eval_dataset
    if source is None:
        raise RuntimeError(f"{type(data).__name__}.setup('fit') did not build train_eval_dataset")
    labels, biases = _labels_and_biases(source)
    scores = read_scores(topk)  # missing file, no rows, bad values: errors naming it
    check_scores(scores, labels)
    indices = np.sort(scores.indices) if k is None else select_content_pool(scores, k, k_source)
    present = np.bincount(labels[indices], minlength=num_classes)
    empty = [c for c in range(num_classes) if present[c] == 0]
    if empty:
        raise ValueError(
            f"top-K file {topk} has no rows for class(es) {empty} (of {num_classes}): a generator trained on "
            "this pool could not make them and the label rule could never give them; rerun "
            f"`{topk_stage_hint(Path(topk))}` with per_class: true"
        )
    images = torch.stack([source[int(i)]["image"].float() for i in indices])
    return TopKPool(Path(topk), indices, labels[indices], biases[indices], images, len(source))


class _TopKSource(LightningDataModule):
    """Shared part: the wrapped dataset module, the top-K file and the pool built at setup."""

    def __init__(
        self, data: BiasedDataModule, topk: str, k: int | None, k_source: KSource, batch_size: int
    ) -> None:
        super().__init__()
        if k is not None and k < 1:
            raise ValueError(f"k must be >= 1 or null (every row of the top-K file), got {k}")
        if k_source not in ("per_class", "global"):
            raise ValueError(f"k_source must be 'per_class' or 'global', got {k_source!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.topk_path = Path(topk)
        if not self.topk_path.is_file():
            raise FileNotFoundError(
                f"top-K file {self.topk_path} not found: the top-K stage writes it "
                "(`diffinject predict --config configs/<dataset>/topk.yaml`)"
            )
        self.data, self.k, self.k_source, self.batch_size = data, k, k_source, batch_size
        self.name, self.pct = data.name, data.pct
        self.num_classes, self.image_size, self.channels = data.num_classes, data.image_size, data.channels
        self.pool: TopKPool | None = None

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.pool is None:
            self.pool = load_topk_pool(self.data, self.topk_path, self.k, self.k_source, self.num_classes)
            log.info(
                "top-K pool from %s: %d images, per class %s",
                self.topk_path, len(self.pool.indices), self.pool.class_counts(self.num_classes),
            )  # fmt: skip

    def require_pool(self) -> TopKPool:
        if self.pool is None:
            raise RuntimeError(f"{type(self).__name__}: call setup() first")
        return self.pool


class _PoolImages(Dataset):
    def __init__(self, pool: TopKPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pool
        return {"image": p.images[i], "label": int(p.labels[i]), "index": int(p.indices[i])}


class TopKImagesDataModule(_TopKSource):
    """Fit data of a GAN on the top-K (A²'s adaptation, AmpliBias): batches drawn with replacement.

    Items are {image, label, index}; the GANs read the image only.

    Args:
        data: the dataset module (its `train_eval_dataset` is read).
        topk: the seed's `topk.csv` (runs/{dataset}/{pct}/bias/topk.csv).
        k: pool size per class (`per_class`) or overall (`global`); null: every row of the file.
        batch_size: images per GAN iteration (FastGAN: 8; CDC: 4).
        iterations_per_epoch: batches an epoch (epochs only pace logging; `trainer.max_steps` ends the run).
    """

    def __init__(
        self,
        data: BiasedDataModule,
        topk: str,
        k: int | None = None,
        k_source: KSource = "per_class",
        batch_size: int = 8,
        iterations_per_epoch: int = 100,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data, topk, k, k_source, batch_size)
        if iterations_per_epoch < 1 or num_workers < 0:
            raise ValueError(
                "need iterations_per_epoch >= 1 and num_workers >= 0, "
                f"got {iterations_per_epoch}, {num_workers}"
            )
        self.iterations_per_epoch, self.num_workers = iterations_per_epoch, num_workers

    def train_dataloader(self) -> DataLoader:
        dataset = _PoolImages(self.require_pool())
        sampler = RandomSampler(
            dataset, replacement=True, num_samples=self.iterations_per_epoch * self.batch_size
        )
        return DataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True, num_workers=self.num_workers
        )


class _SampleSeeds(Dataset):
    def __init__(self, ids: list[int], seeds: np.ndarray) -> None:
        self.ids, self.seeds = ids, seeds

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, position: int) -> dict[str, int]:
        i = self.ids[position]
        return {"index": i, "noise_seed": int(self.seeds[i])}


def sample_noise_seeds(num_samples: int, seed: int) -> np.ndarray:
    """Sample i's noise seed from `default_rng([seed, i])` alone (independent of batching and resumes)."""
    return np.array(
        [np.random.default_rng([seed, i]).integers(0, 2**62) for i in range(num_samples)], dtype=np.int64
    )


class GeneratorSamplesDataModule(_TopKSource):
    """Predict data of a generator sampled N = int(ratio × |train|) times: {index, noise_seed} per sample.

    Holds the top-K pool the labels are read from (`pool`) and the plan (`plan`: noise seed per sample);
    `skip_samples` leaves out what an earlier run wrote (resume).

    Args:
        data, topk, k, k_source: as `TopKImagesDataModule` (the pool the generator was trained on).
        ratio: N = int(ratio × |train|) samples (the inject stage's rule).
        seed: sampling seed (the pipeline passes the run's seed).
        batch_size / num_workers: predict loader settings.
    """

    def __init__(
        self,
        data: BiasedDataModule,
        topk: str,
        k: int | None = None,
        k_source: KSource = "per_class",
        ratio: float = 0.1,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(data, topk, k, k_source, batch_size)
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0 (N = ratio × |train|), got {ratio}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.ratio, self.seed, self.num_workers = ratio, seed, num_workers
        self.plan: np.ndarray | None = None
        self.done: set[int] = set()

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.plan is None:
            num_samples = int(self.ratio * self.require_pool().num_train)
            if num_samples < 1:
                raise ValueError(
                    f"ratio={self.ratio} × {self.require_pool().num_train} training images gives no sample"
                )
            self.plan = sample_noise_seeds(num_samples, self.seed)

    def skip_samples(self, done: list[int] | set[int]) -> None:
        """Leave these sample indices out of the predict loader (already written by an earlier run)."""
        self.done = {int(i) for i in done}

    def predict_dataloader(self) -> DataLoader:
        if self.plan is None:
            raise RuntimeError("GeneratorSamplesDataModule: call setup('predict') first")
        todo = [i for i in range(len(self.plan)) if i not in self.done]
        return DataLoader(
            _SampleSeeds(todo, self.plan),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
