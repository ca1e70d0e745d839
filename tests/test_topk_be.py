"""`TopKWriter(k_source="be")`: unflagged images ranked by committee loss, flagged ones only fill up."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from diffinject.callbacks import TopKWriter
from diffinject.callbacks.topk import COLUMNS, rank_scores, select_topk
from diffinject.stages import BiasClassifier
from diffinject.stages.bias_ensemble import Committee, EnsembleOptions, write_committee
from test_classifiers import ARGS, TinyBiasedDataModule, tiny_trainer

BE_SCORES = {
    "index": torch.tensor([0, 1, 2, 3, 4, 5, 6]),
    "label": torch.tensor([0, 0, 0, 0, 1, 1, 1]),
    "loss": torch.tensor([5.0, 0.3, 0.9, 0.1, 0.2, 4.0, 0.5]),  # committee loss
    "flagged": torch.tensor([True, False, False, False, False, True, True]),
    "bias": torch.tensor([0, 1, 2, 0, 0, 1, 1]),
}


def test_be_ranks_unflagged_images_by_committee_loss_and_fills_up_with_flagged() -> None:
    ranks = rank_scores(BE_SCORES["index"], BE_SCORES["label"], BE_SCORES["loss"], True, BE_SCORES["flagged"])
    # class 0: unflagged 2 (0.9), 1 (0.3), 3 (0.1), then flagged 0 despite its loss 5.0
    assert ranks.tolist() == [4, 2, 1, 3, 1, 2, 3]
    rows = select_topk(BE_SCORES, k=2)
    assert [(r["index"], r["rank"]) for r in rows] == [(2, 1), (1, 2), (4, 1), (5, 2)]
    # class 1 has one unflagged image: the flagged one of highest committee loss fills the second slot
    assert rows[-1]["loss"] == pytest.approx(4.0)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == COLUMNS  # the inject stage reads the same format
        return list(reader)


def test_writer_with_a_committee_in_a_predict_run(tmp_path: Path) -> None:
    data = TinyBiasedDataModule(n_train=60, ratio=0.1)
    tiny_trainer(tmp_path, max_epochs=3).fit(BiasClassifier(**ARGS, lr=1e-2), datamodule=data)
    output = tmp_path / "bias" / "topk.csv"
    # a cached committee: flags every aligned image but three (bias labels used to build the fixture only)
    data.setup("predict")
    train = data.train_eval_dataset
    flagged = train.labels == train.biases
    flagged[torch.nonzero(flagged)[:3, 0]] = False
    loss = torch.linspace(3.0, 0.1, 60)
    committee = Committee(torch.arange(60), train.labels.clone(), flagged.long() * 3, flagged, loss)
    options = {"num_models": 3, "steps": 5, "agreement": 2}
    write_committee(output.parent, committee, EnsembleOptions.parse(options).committee_key(1e-3), {"x": 1})

    writer = TopKWriter(output=str(output), k=4, k_source="be", bias_ensemble=options)
    scorer = BiasClassifier(**ARGS, weights=str(tmp_path / "checkpoints" / "best.ckpt"))
    tiny_trainer(tmp_path, callbacks=[writer]).predict(scorer, datamodule=data, return_predictions=False)

    rows = read_rows(output)
    for label in range(3):
        in_class = [r for r in rows if int(r["label"]) == label]
        unflagged = [i for i in range(60) if int(train.labels[i]) == label and not flagged[i]]
        expected = sorted(unflagged, key=lambda i: -float(loss[i]))[:4]
        chosen = [int(r["index"]) for r in in_class][: len(expected)]
        assert chosen == expected  # unflagged first, by committee loss
        assert [float(r["loss"]) for r in in_class] == pytest.approx(
            [float(loss[int(r["index"])]) for r in in_class], rel=1e-5
        )
    summary = json.loads((output.parent / "topk_summary.json").read_text())
    assert summary["k_source"] == "be" and summary["gce_precision"] is not None
    assert summary["num_flagged_selected"] == sum(bool(flagged[int(r["index"])]) for r in rows)
    assert summary["bias_ensemble"]["metrics"] == {"x": 1}  # read from the cache, not retrained
    with pytest.raises(ValueError, match="k_source"):
        TopKWriter(output=str(output), k_source="ensemble")
