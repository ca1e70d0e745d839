"""BiasEnsemble: the vote rule on known probabilities, the cache, LfF+BE's bias branch on flagged images."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffinject.nets import build_classifier
from diffinject.stages import LfFClassifier
from diffinject.stages import bias_ensemble as be
from diffinject.stages.bias_ensemble import (
    Committee,
    EnsembleOptions,
    committee_metrics,
    committee_vote,
    ensure_committee,
    read_committee,
    run_committee,
    write_committee,
)
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer


def test_vote_flags_an_image_when_enough_members_are_confident() -> None:
    # 5 members × 4 images: p(label) per member
    prob = torch.tensor(
        [
            [0.995, 0.995, 0.990, 0.50],
            [0.995, 0.995, 0.999, 0.99],
            [0.995, 0.10, 0.999, 0.999],
            [0.20, 0.10, 0.999, 0.999],
            [0.20, 0.10, 0.20, 0.999],
        ]
    )
    votes, flagged = committee_vote(prob, threshold=0.99, agreement=3)
    # strictly above the threshold: 0.990 and 0.99 do not vote
    assert votes.tolist() == [3, 2, 3, 3]
    assert flagged.tolist() == [True, False, True, True]
    assert committee_vote(prob, threshold=0.99, agreement=4)[1].tolist() == [False, False, False, False]
    assert committee_vote(prob, threshold=0.4, agreement=4)[1].tolist() == [False, False, True, True]


def test_committee_metrics_use_bias_labels_only_for_counting() -> None:
    flagged = torch.tensor([True, True, True, False, False, False])
    label = torch.tensor([0, 1, 2, 0, 1, 2])
    bias = torch.tensor([0, 1, 0, 0, 2, -1])  # aligned, aligned, conflicting, aligned, conflicting, unknown
    m = committee_metrics(flagged, label, bias)
    assert (m["num_flagged"], m["num_flagged_conflicting"], m["num_conflicting"]) == (3, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["conflicting_unflagged_rate"] == pytest.approx(1 / 2)


def test_options_are_checked() -> None:
    assert EnsembleOptions.parse(None) is None
    assert EnsembleOptions.parse({}) == EnsembleOptions()
    assert EnsembleOptions().committee_key(0.01)["lr"] == 0.01
    assert EnsembleOptions(lr=0.5).committee_key(0.01)["lr"] == 0.5
    with pytest.raises(ValueError, match="unknown bias_ensemble option"):
        EnsembleOptions.parse({"members": 3})
    with pytest.raises(ValueError, match="agreement"):
        EnsembleOptions(num_models=2, agreement=3)
    with pytest.raises(ValueError, match="bias_loss"):
        EnsembleOptions(bias_loss="focal")


def _committee(n: int, flagged: list[int]) -> Committee:
    flags = torch.zeros(n, dtype=torch.bool)
    flags[flagged] = True
    return Committee(torch.arange(n), torch.arange(n) % 3, flags.long() * 5, flags, torch.linspace(2, 0, n))


def test_cache_round_trip_and_option_mismatch(tmp_path: Path) -> None:
    committee = _committee(6, [0, 2, 5])
    key = EnsembleOptions(steps=7).committee_key(0.01)
    write_committee(tmp_path, committee, key, {"num_flagged": 3})
    header = (tmp_path / "bias_ensemble.csv").read_text().splitlines()[0]
    assert header == "index,label,votes,flagged,loss"
    loaded, info = read_committee(tmp_path, key)
    assert torch.equal(loaded.flagged, committee.flagged) and torch.allclose(loaded.loss, committee.loss)
    assert info["metrics"]["num_flagged"] == 3
    assert read_committee(tmp_path, EnsembleOptions(steps=8).committee_key(0.01)) is None
    assert loaded.flags_by_index(6).tolist() == [True, False, True, False, False, True]
    with pytest.raises(ValueError, match="another dataset"):
        loaded.flags_by_index(4)


def _fake_trainer() -> SimpleNamespace:
    return SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda name: None))


def test_ensure_committee_trains_once_then_reads_the_cache(tmp_path: Path, monkeypatch) -> None:
    data = TinyBiasedDataModule(n_train=60, ratio=0.1)
    data.setup("fit")
    options = EnsembleOptions(num_models=3, steps=60, check_every=20, agreement=2, threshold=0.8)
    make = lambda: build_classifier("mlp", 3, 3, 6)  # noqa: E731
    calls = []
    original = be.run_committee
    monkeypatch.setattr(be, "run_committee", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    with torch.inference_mode():  # as inside a predict run (k_source: be): training must still work
        committee, info = ensure_committee(
            tmp_path, options, 0.01, make, data, torch.device("cpu"), _fake_trainer()
        )
    again, _ = ensure_committee(tmp_path, options, 0.01, make, data, torch.device("cpu"), _fake_trainer())
    assert calls == [1] and torch.equal(again.flagged, committee.flagged)
    # the colour-biased tiny set: the committee flags aligned images, and (almost) no conflicting one
    metrics = info["metrics"]
    assert metrics["num_images"] == 60 and metrics["num_flagged"] >= 45
    assert metrics["num_flagged_conflicting"] == 0 and metrics["num_conflicting"] == 5
    assert committee.index.tolist() == list(range(60))


def test_run_committee_scores_every_item_in_index_order() -> None:
    data = TinyBiasedDataModule(n_train=30)
    data.setup("fit")
    options = EnsembleOptions(num_models=2, steps=3, check_every=0, agreement=1)
    committee, bias = run_committee(
        lambda: build_classifier("mlp", 3, 3, 6), data.train_dataloader(), data.predict_dataloader(), None,
        options, 0.01, torch.device("cpu"),
    )  # fmt: skip
    assert committee.index.tolist() == list(range(30)) and torch.equal(bias, data.train_eval_dataset.biases)
    assert ((committee.votes >= 0) & (committee.votes <= 2)).all() and (committee.loss > 0).all()


def test_lff_be_bias_branch_learns_from_flagged_images_only(tmp_path: Path) -> None:
    """The committee read from the run folder's cache; f_B's logits get gradient only on flagged items."""
    data = TinyBiasedDataModule(n_train=48, batch_size=48)
    options = {"num_models": 1, "steps": 1, "agreement": 1}
    flagged = [i for i in range(48) if i % 4 != 0]
    write_committee(tmp_path, _committee(48, flagged), EnsembleOptions.parse(options).committee_key(1e-3), {})
    model = LfFClassifier(**ARGS, bias_ensemble=options)
    grads: list[torch.Tensor] = []
    forward = model.net_b.forward

    def recording(images: torch.Tensor) -> torch.Tensor:
        out = forward(images)
        if out.requires_grad:
            out.register_hook(lambda grad: grads.append(grad.clone()))
        return out

    model.net_b.forward = recording
    tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=data)
    assert model.aligned_flags.tolist() == [i in flagged for i in range(48)]
    (grad,) = grads  # one step on one batch holding the whole (shuffled) training set
    assert grad.shape[0] == 48
    # only the 36 flagged items' rows carry gradient: f_B's loss is CE over the flagged items only
    assert int((grad.abs().sum(1) > 0).sum()) == len(flagged) == 36
