"""DDP on CPU (2 spawned gloo processes): LfF's per-sample EMAs stay global and identical on every rank, and
the top-K writer merges per-rank shards into the single-device result. Slow: `make test-slow`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from diffinject.callbacks import TopKWriter
from diffinject.stages import BiasClassifier, LfFClassifier
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer

pytestmark = pytest.mark.slow


class DumpEMA(Callback):
    """Each rank writes its EMA state at the end of training (spawned processes do not return attributes)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.save(
            {k: v.cpu() for k, v in pl_module.ema.items()}, Path(self.folder) / f"ema{trainer.global_rank}.pt"
        )


def ddp_trainer(root: Path, **kwargs: object) -> Trainer:
    return tiny_trainer(root, accelerator="cpu", devices=2, strategy="ddp_spawn", **kwargs)


def test_lff_ema_is_global_and_identical_across_ranks(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=64, batch_size=8)
    ddp_trainer(tmp_path, max_epochs=1, callbacks=[DumpEMA(str(tmp_path))]).fit(LfFClassifier(**ARGS), data)
    rank0, rank1 = (torch.load(tmp_path / f"ema{r}.pt", weights_only=True) for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    # every item was seen once in the epoch, although each rank only loaded half of them
    data.setup("fit")  # (the spawned ranks set up their own copies)
    assert bool((rank0["seen_b"] == 1).all()) and torch.equal(rank0["label"], data.train_eval_dataset.labels)


def test_topk_shards_merge_to_the_single_device_result(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=61, batch_size=8)  # odd: ranks get 31 and 30 items
    tiny_trainer(tmp_path, max_epochs=3).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    weights = str(tmp_path / "checkpoints" / "best.ckpt")
    for name, make in (("single", tiny_trainer), ("ddp", ddp_trainer)):
        writer = TopKWriter(output=str(tmp_path / name / "topk.csv"), k=5)
        make(tmp_path / name, callbacks=[writer]).predict(
            BiasClassifier(**ARGS, weights=weights), datamodule=data, return_predictions=False
        )
    single, ddp = ((tmp_path / n / "topk.csv").read_text().splitlines() for n in ("single", "ddp"))
    assert len(single) == 16 and [r.split(",")[0] for r in single] == [r.split(",")[0] for r in ddp]
    summary = json.loads((tmp_path / "ddp" / "topk_summary.json").read_text())
    assert summary["num_scored"] == 61
