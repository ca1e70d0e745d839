"""DisEnt, LfF+BE and DisEnt+BE through the real CLI and configs; the top-K stage with `k_source: be`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from test_cli_classifiers import CONFIGS, tiny

NEW_STAGES = ("disent", "lff_be", "disent_be")
TINY_BE = "{num_models: 2, steps: 3, check_every: 2, agreement: 1}"
SHORT = [
    "--trainer.max_epochs",
    "2",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["diffinject"])


@pytest.mark.parametrize("dataset", ["cmnist", "ccifar10", "bffhq", "dogscats"])
@pytest.mark.parametrize("stage", NEW_STAGES)
def test_new_configs_parse(dataset: str, stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / dataset / f"{stage}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"runs/{dataset}/" in printed and f"/{stage}" in printed
    assert ("bias_ensemble: null" in printed) != stage.endswith("_be")


@pytest.mark.parametrize("stage", NEW_STAGES)
def test_fit_then_test_on_embedded_cmnist(tmp_path: Path, stage: str) -> None:
    run, data = tmp_path / stage, tmp_path / "data"
    config = str(CONFIGS / "cmnist" / f"{stage}.yaml")
    extra = ["--model.init_args.selection_bias", "null"]  # selection with a bias stage: test_selection_rule
    if stage.startswith("disent"):
        extra += ["--model.init_args.swap_start", "2", "--model.init_args.lr_decay_step", "1"]
    if stage.endswith("_be"):
        extra += ["--model.init_args.bias_ensemble", TINY_BE]
    cli = main(["fit", "--config", config, *tiny(run, data), *SHORT, *extra])
    if stage.startswith("disent"):  # the swap ran (from step 2 of 4)
        assert float(cli.trainer.callback_metrics["train/swap_active"]) > 0
    if stage.endswith("_be"):
        info = json.loads((run / "bias_ensemble.json").read_text())
        assert info["options"]["steps"] == 3 and info["metrics"]["num_images"] == 3600
        with (run / "bias_ensemble.csv").open() as handle:
            assert len(list(csv.DictReader(handle))) == 3600
    best = run / "checkpoints" / "best.ckpt"
    test = ["test", "--config", config, *tiny(run, data), *extra, "--ckpt_path", str(best)]
    main([*test, "--trainer.limit_test_batches", "1"])
    metrics = json.loads((run / "metrics.json").read_text())
    expected = {"DisEntClassifier" if stage.startswith("disent") else "LfFClassifier"}
    assert {metrics["stage"]} == expected and metrics["checkpoint"] == str(best)
    assert set(metrics["test"]) >= {
        "test/acc",
        "test/acc_aligned",
        "test/acc_conflicting",
        "test/acc_worst_group",
    }
    assert metrics["selection"]["rule"] == "val/acc" and metrics["val"]["val/acc"] is not None
    assert ("bias_ensemble" in metrics) == stage.endswith("_be")


def test_topk_with_the_committee_from_the_cli(tmp_path: Path) -> None:
    run, data = tmp_path / "bias", tmp_path / "data"
    bias = str(CONFIGS / "cmnist" / "bias.yaml")
    main(["fit", "--config", bias, *tiny(run, data), *SHORT])
    output = run / "topk.csv"
    main(
        [
            "predict", "--config", str(CONFIGS / "cmnist" / "topk.yaml"), *tiny(run / "topk", data),
            "--model.init_args.weights", str(run / "checkpoints" / "best.ckpt"),
            "--trainer.callbacks.init_args.output", str(output),
            "--trainer.callbacks.init_args.k_source", "be",
            "--trainer.callbacks.init_args.bias_ensemble", TINY_BE,
        ]
    )  # fmt: skip
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 100 and (run / "bias_ensemble.csv").is_file()
    summary = json.loads((run / "topk_summary.json").read_text())
    assert summary["k_source"] == "be"
    gce_output = tmp_path / "gce" / "topk.csv"  # the same checkpoint's GCE top-K, run on its own
    main(
        [
            "predict", "--config", str(CONFIGS / "cmnist" / "topk.yaml"),
            *tiny(tmp_path / "gce" / "topk", data),
            "--model.init_args.weights", str(run / "checkpoints" / "best.ckpt"),
            "--trainer.callbacks.init_args.output", str(gce_output),
        ]
    )  # fmt: skip
    gce_summary = json.loads((gce_output.parent / "topk_summary.json").read_text())
    assert summary["gce_precision"] == pytest.approx(gce_summary["precision"])
    module = CMNISTDataModule(root=str(data), ratio=0.01, source="embedded")
    module.setup("fit")
    train = module.train_eval_dataset  # the precision is the committee's selection's true conflicting share
    indices = [int(r["index"]) for r in rows]
    assert [int(r["bias"]) for r in rows] == [int(train.biases[i]) for i in indices]
    truth = float(np.mean([train.labels[i] != train.biases[i] for i in indices]))
    assert summary["precision"] == pytest.approx(truth)
