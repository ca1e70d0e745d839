"""DisEnt: the network, the loss terms on a hand-made batch (swap = a permutation of the batch), the warm-up,
the lr schedule, and the module end to end (with and without BiasEnsemble)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from diffinject.nets import DisEntNet
from diffinject.stages import DisEntClassifier
from diffinject.stages.disent import disent_loss_terms, disent_lr_factor
from diffinject.stages.losses import bias_branch_loss, gce_loss
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer


def test_disent_mlp_is_two_2352_100_100_16_encoders_with_32_wide_heads() -> None:
    net = DisEntNet("mlp", 10, 3, 28)
    shapes = [
        (m.in_features, m.out_features) for m in net.encoder_i.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert shapes == [(2352, 100), (100, 100), (100, 16)]
    assert (net.head_i.in_features, net.head_b.in_features, net.head_i.out_features) == (32, 32, 10)
    z_i, z_b = net.features(torch.rand(4, 3, 28, 28))
    assert z_i.shape == z_b.shape == (4, 16) and bool((z_i >= 0).all())  # ReLU after the last layer
    assert net(torch.rand(4, 3, 28, 28)).shape == (4, 10)
    assert DisEntNet("resnet18", 2, 3, 32).head_i.in_features == 1024


def gce_bias_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return bias_branch_loss(logits, target, q=0.7, kind="gce", mask=mask)


def test_loss_terms_swap_the_bias_features_by_a_batch_permutation() -> None:
    torch.manual_seed(0)
    net = DisEntNet("mlp", 3, 3, 6)
    z_i = torch.randn(4, 16, requires_grad=True)
    z_b = torch.randn(4, 16, requires_grad=True)
    label = torch.tensor([0, 1, 2, 0])
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4])
    perm = torch.tensor([2, 0, 3, 1])
    terms = disent_loss_terms(net, z_i, z_b, label, weight, gce_bias_loss, perm)

    z_swap = z_b[perm]  # row r gets the bias features of item perm[r], and its label
    logits_i = net.head_i(torch.cat((z_i, z_swap), 1))
    logits_b = net.head_b(torch.cat((z_i, z_swap), 1))
    expected_i = (F.cross_entropy(logits_i, label, reduction="none") * weight).mean()
    expected_b = gce_loss(logits_b, label[perm]).mean()
    assert float(terms["swap_i"]) == pytest.approx(float(expected_i), rel=1e-5)
    assert float(terms["swap_b"]) == pytest.approx(float(expected_b), rel=1e-5)
    dis_i = (F.cross_entropy(net.head_i(torch.cat((z_i, z_b), 1)), label, reduction="none") * weight).mean()
    assert float(terms["dis_i"]) == pytest.approx(float(dis_i), rel=1e-5)

    # disentanglement: the intrinsic terms never reach z_b, the bias terms never reach z_i
    grad_b = torch.autograd.grad(terms["dis_i"] + terms["swap_i"], z_b, allow_unused=True)[0]
    assert grad_b is None or float(grad_b.abs().sum()) == 0.0
    grad_i = torch.autograd.grad(terms["dis_b"] + terms["swap_b"], z_i, allow_unused=True)[0]
    assert grad_i is None or float(grad_i.abs().sum()) == 0.0

    # a permutation only moves rows: the identity swap reproduces the un-swapped terms
    same = disent_loss_terms(net, z_i, z_b, label, weight, gce_bias_loss, torch.arange(4))
    assert float(same["swap_i"]) == pytest.approx(float(same["dis_i"]), rel=1e-6)
    off = disent_loss_terms(net, z_i, z_b, label, weight, gce_bias_loss, None)
    assert float(off["swap_i"]) == 0.0 and float(off["swap_b"]) == 0.0


def test_swapped_bias_loss_follows_the_flags_of_the_swapped_in_items() -> None:
    torch.manual_seed(1)
    net = DisEntNet("mlp", 3, 3, 6)
    z_i, z_b = torch.randn(4, 16), torch.randn(4, 16)
    label, weight = torch.tensor([0, 1, 2, 1]), torch.ones(4)
    mask = torch.tensor([True, False, False, True])
    perm = torch.tensor([1, 3, 0, 2])  # rows 1 and 2 receive the flagged items 3 and 0

    def ce(logits: torch.Tensor, target: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
        return bias_branch_loss(logits, target, kind="ce", mask=m)

    terms = disent_loss_terms(net, z_i, z_b, label, weight, ce, perm, mask)
    logits = net.head_b(torch.cat((z_i, z_b[perm]), 1))[[1, 2]]
    assert float(terms["swap_b"]) == pytest.approx(float(F.cross_entropy(logits, label[[3, 0]])), rel=1e-5)
    dis = F.cross_entropy(net.head_b(torch.cat((z_i, z_b), 1))[[0, 3]], label[[0, 3]])
    assert float(terms["dis_b"]) == pytest.approx(float(dis), rel=1e-5)


def test_swap_is_off_before_the_warm_up_step_and_on_after() -> None:
    model = DisEntClassifier(**ARGS, swap_start=5)
    model._trainer = SimpleNamespace(global_step=4)
    assert model.swap_permutation(6) is None
    model._trainer = SimpleNamespace(global_step=5)
    perm = model.swap_permutation(6)
    assert perm is not None and sorted(perm.tolist()) == list(range(6))


def test_lr_decays_every_step_size_after_the_swap_start() -> None:
    # the reference (StepLR stepped from curr_step on): 10k swap start, ×0.5 every 10k → first decay at 20k
    factors = [disent_lr_factor(s, 10000, 10000, 0.5) for s in (0, 9999, 19999, 20000, 30000, 49999)]
    assert factors == [1.0, 1.0, 1.0, 0.5, 0.25, 0.125]
    assert disent_lr_factor(30000, 10000, None, 0.5) == 1.0


def test_disent_trains_swaps_and_decays(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=90, ratio=0.15)  # 6 steps per epoch
    model = DisEntClassifier(**ARGS, lr=1e-2, swap_start=6, lr_decay_step=4, lr_gamma=0.5)
    trainer = tiny_trainer(tmp_path, max_epochs=3)
    trainer.fit(model, datamodule=data)
    metrics = trainer.callback_metrics
    assert float(metrics["train/swap_active"]) == 1.0 and float(metrics["train/loss_swap"]) > 0
    assert float(metrics["train/weight_conflicting"]) > float(metrics["train/weight_aligned"])
    assert "val/acc_bias_model" in metrics
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** ((18 - 6) // 4))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["diffinject"]["lff_ema"]["loss_b"].shape == (90,)
    assert any(k.startswith("net.encoder_b.") for k in checkpoint["state_dict"])
    trainer.test(model, datamodule=data, ckpt_path=str(tmp_path / "checkpoints" / "best.ckpt"))
    assert (tmp_path / "metrics.json").is_file()


def test_disent_be_reads_the_committee_and_masks_the_bias_head(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=60)
    options = {"num_models": 3, "steps": 40, "check_every": 20, "agreement": 2, "threshold": 0.8}
    model = DisEntClassifier(**ARGS, lr=1e-2, swap_start=0, bias_ensemble=options)
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    trainer.fit(model, datamodule=data)
    assert (tmp_path / "bias_ensemble.csv").is_file() and model.aligned_flags is not None
    with (tmp_path / "bias_ensemble.csv").open() as handle:  # one epoch sees every item once
        flagged = [int(row["flagged"]) for row in csv.DictReader(handle)]
    logged = float(trainer.callback_metrics["train/bias_flagged_frac"])
    assert 0 < sum(flagged) < len(flagged) and logged == pytest.approx(sum(flagged) / len(flagged), abs=1e-6)
