"""LfF: per-sample EMA, class-wise max normalisation and W on a hand-made batch; the module end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffinject.stages import LfFClassifier
from diffinject.stages.losses import classwise_max, ema_update, lff_weights
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer


def test_ema_first_visit_stores_raw_loss_then_averages() -> None:
    ema, seen = torch.zeros(4), torch.zeros(4)
    ema_update(ema, seen, torch.tensor([0, 2]), torch.tensor([1.0, 3.0]), alpha=0.7)
    assert ema.tolist() == pytest.approx([1.0, 0.0, 3.0, 0.0])
    ema_update(ema, seen, torch.tensor([0, 1]), torch.tensor([2.0, 5.0]), alpha=0.7)
    assert ema.tolist() == pytest.approx([0.7 * 1.0 + 0.3 * 2.0, 5.0, 3.0, 0.0])
    assert seen.tolist() == [1.0, 1.0, 1.0, 0.0]


def test_classwise_max_ignores_unseen_items() -> None:
    values = torch.tensor([1.0, 4.0, 2.0, 9.0, 0.5])
    labels = torch.tensor([0, 0, 1, -1, 1])  # -1 = not visited yet
    assert classwise_max(values, labels, 3).tolist() == [4.0, 2.0, 0.0]


def test_lff_weights_on_a_hand_made_batch() -> None:
    # class 0: max_b = 4, max_d = 2; class 1: max_b = 1, max_d = 8
    max_b, max_d = torch.tensor([4.0, 1.0]), torch.tensor([2.0, 8.0])
    ema_b = torch.tensor([4.0, 1.0, 0.5, 1.0])
    ema_d = torch.tensor([2.0, 2.0, 4.0, 0.0])
    labels = torch.tensor([0, 0, 1, 1])
    w = lff_weights(ema_b, ema_d, labels, max_b, max_d)
    # normalised (b, d): (1, 1) → 0.5; (0.25, 1) → 0.2; (0.5, 0.5) → 0.5; (1, 0) → 1
    assert w.tolist() == pytest.approx([0.5, 0.2, 0.5, 1.0], abs=1e-6)
    assert not w.requires_grad


def test_module_step_weights_follow_the_reference_math() -> None:
    model = LfFClassifier(**ARGS)
    model.num_train = 6
    model.on_fit_start()
    model._trainer = type("T", (), {"world_size": 1})()
    batch = {"index": torch.tensor([0, 1, 2, 3]), "label": torch.tensor([0, 0, 1, 1])}
    w = model.lff_step_weights(batch, torch.tensor([2.0, 1.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 3.0, 3.0]))
    # first visit: EMA = raw loss; class maxima b: (2, 3), d: (1, 3)
    assert w.tolist() == pytest.approx([0.5, (0.5 / 1.5), (1 / 3) / (1 / 3 + 1), 0.5], abs=1e-6)
    # second visit of item 1 averages: ema_b = 0.7·1 + 0.3·2 = 1.3 → new class-0 maxima b = 2, d = 1
    batch = {"index": torch.tensor([1]), "label": torch.tensor([0])}
    w = model.lff_step_weights(batch, torch.tensor([2.0]), torch.tensor([1.0]))
    assert w.tolist() == pytest.approx([(1.3 / 2) / (1.3 / 2 + 1.0)], abs=1e-6)
    with pytest.raises(IndexError, match="training set size 6"):
        model.lff_step_weights(
            {"index": torch.tensor([9]), "label": torch.tensor([0])}, torch.ones(1), torch.ones(1)
        )


def test_lff_trains_both_nets_and_upweights_conflicting_items(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=90, ratio=0.15)
    model = LfFClassifier(**ARGS, lr=1e-2)
    before_b = [p.detach().clone() for p in model.net_b.parameters()]
    trainer = tiny_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    assert any(not torch.equal(a, b) for a, b in zip(before_b, model.net_b.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert float(metrics["train/weight_conflicting"]) > float(metrics["train/weight_aligned"])
    assert "val/acc_bias_model" in metrics and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    # the EMA state travels with the checkpoint so a resumed run continues it
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    ema = checkpoint["diffinject"]["lff_ema"]
    assert ema["loss_b"].shape == (90,) and bool((ema["seen_b"] == 1).all())
    resumed = LfFClassifier(**ARGS, lr=1e-2)
    resumed.num_train = 90  # what setup("fit") reads from the data module
    resumed.on_load_checkpoint(checkpoint)
    resumed.on_fit_start()
    assert all(torch.equal(resumed.ema[key], ema[key]) for key in ema)
