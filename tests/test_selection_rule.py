"""The label-free selection rule: soft pseudo-groups, and the fallback that stops a tiny group deciding."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from diffinject.measures.metrics import (
    PseudoGroupAccuracy,
    keep_last_epoch,
    pseudo_balanced_se,
    selection_fallback,
)
from diffinject.stages import BiasClassifier, VanillaClassifier
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location(
        "selection_rules", REPO / "benchmarks" / "selection_rules.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soft_groups_weight_each_image_by_the_bias_models_doubt() -> None:
    target = torch.tensor([0, 1, 2, 0])
    # bias model: p(label) = 0.9, 0.5, 0.2 (wrong), ~1
    p = torch.tensor([[0.9, 0.05, 0.05], [0.25, 0.5, 0.25], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])
    right = torch.tensor([True, False, True, True])
    preds = torch.where(right, target, (target + 1) % 3)
    metric = PseudoGroupAccuracy()
    metric.update(preds, target, p.clamp_min(1e-12).log())  # logits whose softmax is p
    groups = metric.compute_groups()
    w = torch.tensor([0.1, 0.5, 0.8, 0.0])  # 1 − p(label)
    conflicting = float((w * right).sum() / w.sum())
    aligned = float(((1 - w) * right).sum() / (1 - w).sum())
    assert float(groups["conflicting_size"]) == pytest.approx(1.4, abs=1e-6)
    assert float(groups["wrong_count"]) == 1  # only the third image's argmax is wrong
    assert float(groups["conflicting"]) == pytest.approx(conflicting, abs=1e-6)
    assert float(groups["balanced"]) == pytest.approx((conflicting + aligned) / 2, abs=1e-6)


def epochs(n_val: int, n_wrong: int, lucky_early: bool) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """A biased epoch 0 and four debiasing epochs on a validation split where the bias model is wrong on
    `n_wrong` images; with `lucky_early` the biased epoch happens to get that whole group right."""
    labels = torch.arange(n_val) % 4
    wrong = torch.arange(n_val) >= n_val - n_wrong
    logits = torch.full((n_val, 4), -8.0)
    logits[torch.arange(n_val), torch.where(wrong, (labels + 1) % 4, labels)] = 8.0
    rule = load_benchmark()
    rows = []
    test_acc = [0.11, 0.30, 0.34, 0.36, 0.33]
    for epoch, acc in enumerate(test_acc):
        right = torch.ones(n_val, dtype=torch.bool)
        if epoch == 0:
            right[wrong] = lucky_early
        else:  # the debiasing epochs lose a few aligned images and miss one of the "wrong" group
            right[:epoch] = False
            right[torch.nonzero(wrong)[0, 0]] = False
        row = {"epoch": epoch, "test/acc": acc, "val/acc": float(right.float().mean())}
        rows.append({**row, **rule.pseudo_scores(right, labels, logits)})
    return rows, labels, logits


def test_a_tiny_wrong_group_no_longer_picks_a_biased_epoch() -> None:
    rule = load_benchmark()
    rows, _, _ = epochs(n_val=400, n_wrong=3, lucky_early=True)
    chosen = rule.apply_rules(rows, min_group=16)
    assert chosen["pseudo (hard)"]["epoch"] == 0  # the old rule: the lucky, fully biased epoch (11 %)
    assert chosen["pseudo (soft)"]["epoch"] == 0  # soft weights alone cannot fix 3 images
    assert rows[0]["size"] == pytest.approx(3, abs=0.01) and selection_fallback(rows[0]["size"], 16)
    assert chosen["stage rule"]["epoch"] == 4 and chosen["stage rule"]["acc_minus_last"] == 0.0
    assert chosen["oracle"]["epoch"] == 3 and chosen["stage rule"]["acc_minus_oracle"] == pytest.approx(-0.03)
    assert rule.table([{"root": "r", "stage": "lff", "seed": 0, "pseudo_conflicting_size": 3.0,
                        "rules": chosen}]).count("\n") == 4  # fmt: skip


def test_a_large_enough_group_keeps_the_pseudo_group_rule() -> None:
    rule = load_benchmark()
    rows, _, _ = epochs(n_val=400, n_wrong=40, lucky_early=False)
    chosen = rule.apply_rules(rows, min_group=16, margin_se=0.0)  # the margin rule: test below
    assert not selection_fallback(rows[0]["size"], 16)
    assert chosen["stage rule"] == chosen["pseudo (soft)"] and chosen["stage rule"]["epoch"] == 1
    assert chosen["val/acc"]["epoch"] == 1  # with 40 conflicting images the biased epoch is already worse


def test_stage_falls_back_to_the_last_epoch_and_says_so(tmp_path: Path) -> None:
    data = TinyBiasedDataModule()  # 30 validation images, ≈ 9 effective pseudo-conflicting ones
    bias_dir = tmp_path / "bias"
    tiny_trainer(bias_dir, max_epochs=2).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    model = VanillaClassifier(**ARGS, lr=1e-2, selection_bias=str(bias_dir / "checkpoints" / "best.ckpt"))
    run = tmp_path / "vanilla"
    trainer = tiny_trainer(run, max_epochs=3)
    with pytest.warns(UserWarning, match="best.ckpt is the last epoch"):
        trainer.fit(model, datamodule=data)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == 2 and best["diffinject"]["selection"]["rule"] == "last epoch"
    assert best["diffinject"]["selection"]["pseudo_conflicting_size"] < 16
    trainer.test(model, datamodule=data, ckpt_path=str(run / "checkpoints" / "best.ckpt"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["selection"]["rule"] == "last epoch" and metrics["checkpoint_epoch"] == 2


def test_the_margin_rule_keeps_the_last_epoch_unless_an_earlier_one_is_clearly_better() -> None:
    groups = {
        "aligned": torch.tensor(0.9),
        "aligned_size": torch.tensor(100.0),
        "conflicting": torch.tensor(0.5),
        "conflicting_size": torch.tensor(25.0),
    }
    se = pseudo_balanced_se(groups)
    assert se == pytest.approx(0.5 * (0.9 * 0.1 / 100 + 0.25 / 25) ** 0.5)
    assert keep_last_epoch(0.70, 0.70 - 0.9 * se, se, 1.0)  # within one standard error: the last epoch
    assert not keep_last_epoch(0.70, 0.70 - 1.1 * se, se, 1.0)  # clearly better: the best epoch
    assert not keep_last_epoch(0.70, 0.69, se, 0.0)  # margin 0: the plain maximum


def test_a_lucky_early_epoch_within_the_margin_loses_to_the_last_one() -> None:
    """40 pseudo-conflicting images (no fallback): an early epoch one image luckier than the last one is
    within a standard error, so the stage rule keeps the last epoch; with margin 0 it is the old maximum."""
    rows, _, _ = epochs(n_val=400, n_wrong=40, lucky_early=False)
    rule = load_benchmark()
    assert rule.apply_rules(rows, min_group=16, margin_se=0.0)["stage rule"]["epoch"] == 1
    assert rule.apply_rules(rows, min_group=16, margin_se=1.0)["stage rule"]["epoch"] == 4


@pytest.mark.parametrize("margin", [0.0, 1000.0])
def test_stage_applies_the_margin_and_records_it(tmp_path: Path, margin: float) -> None:
    data = TinyBiasedDataModule()
    bias_dir = tmp_path / "bias"
    tiny_trainer(bias_dir, max_epochs=2).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    selection = str(bias_dir / "checkpoints" / "best.ckpt")
    model = VanillaClassifier(
        **ARGS, lr=1e-2, selection_bias=selection, selection_min_group=0.0, selection_margin_se=margin
    )
    run = tmp_path / "vanilla"
    tiny_trainer(run, max_epochs=4).fit(model, datamodule=data)
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["diffinject"]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["diffinject"]
    if margin == 0.0:
        assert best["selection"]["rule"] == "val/acc_pseudo_balanced"
        assert best["val"]["val/acc_pseudo_balanced"] == max(
            best["val"]["val/acc_pseudo_balanced"], last["val"]["val/acc_pseudo_balanced"]
        )
    else:  # an enormous margin: always the last epoch, and the record says why
        assert best["epoch"] == last["epoch"] == 3
        assert best["selection"]["rule"] == "last epoch (best within margin)"
        assert best["selection"]["margin_se"] == margin and best["selection"]["last_se"] > 0


def test_margin_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="selection_margin_se"):
        VanillaClassifier(**ARGS, selection_margin_se=-1.0)


def test_an_unsure_bias_model_does_not_inflate_the_group_the_fallback_counts(tmp_path: Path) -> None:
    """Soft weights from an unsure bias model add up to many 'conflicting' images although its argmax is right
    on all of them: the stage counts the smaller of the two and falls back to the last epoch."""
    metric = PseudoGroupAccuracy()
    target = torch.zeros(40, dtype=torch.long)
    unsure = torch.tensor([[0.5, 0.25, 0.25]]).repeat(40, 1).log()  # p(label) = 0.5, argmax right
    metric.update(target, target, unsure)
    groups = metric.compute_groups()
    assert float(groups["conflicting_size"]) == pytest.approx(20.0) and float(groups["wrong_count"]) == 0
    assert selection_fallback(min(float(groups["conflicting_size"]), float(groups["wrong_count"])), 16)
