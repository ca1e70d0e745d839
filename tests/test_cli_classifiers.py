"""The real classifier configs through the CLI: fit → test → top-K predict, debias with a manifest, seeds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from diffinject.stages import BiasClassifier

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
STAGES = ("vanilla", "lff", "bias", "topk", "debias")
SUBCOMMAND = {"topk": "predict"}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when both args= and pytest's own sys.argv are present.
    monkeypatch.setattr("sys.argv", ["diffinject"])


def tiny(run: Path, data_root: Path) -> list[str]:
    """Overrides that keep a real config tiny and inside tmp_path."""
    return [
        "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
        "--trainer.default_root_dir", str(run),
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--data.init_args.source", "embedded",
        "--data.init_args.root", str(data_root),
    ]  # fmt: skip


@pytest.mark.parametrize("dataset", ["cmnist", "ccifar10", "bffhq", "dogscats"])
@pytest.mark.parametrize("stage", STAGES)
def test_every_config_parses(dataset: str, stage: str, capsys: pytest.CaptureFixture[str]) -> None:
    config = CONFIGS / dataset / f"{stage}.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main([SUBCOMMAND.get(stage, "fit"), "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert f"runs/{dataset}/" in printed and "class_path: diffinject.stages" in printed


def test_fit_test_predict_round_trip_on_embedded_cmnist(tmp_path: Path) -> None:
    run, data = tmp_path / "bias", tmp_path / "data"
    bias = str(CONFIGS / "cmnist" / "bias.yaml")
    few = [
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.limit_val_batches",
        "1",
    ]
    main(["fit", "--config", bias, *tiny(run, data), *few])
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "config.yaml").is_file()

    main(
        [
            "test",
            "--config",
            bias,
            *tiny(run, data),
            "--ckpt_path",
            str(best),
            "--trainer.limit_test_batches",
            "1",
        ]
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["stage"] == "BiasClassifier" and metrics["checkpoint"] == str(best)
    assert metrics["val"]["val/acc"] is not None
    # the reported test accuracies are the checkpoint's, recomputed by hand on the one test batch it saw
    module = CMNISTDataModule(root=str(data), ratio=0.01, source="embedded")
    module.setup("fit")
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    model = BiasClassifier.load_from_checkpoint(best, map_location="cpu", weights_only=True).eval()
    with torch.no_grad():
        correct = model(batch["image"]).argmax(1) == batch["label"]
    conflicting = batch["label"] != batch["bias"]
    assert metrics["test"]["test/acc"] == pytest.approx(correct.float().mean().item(), abs=1e-6)
    assert metrics["test"]["test/acc_conflicting"] == pytest.approx(
        correct[conflicting].float().mean().item(), abs=1e-6
    )

    output = run / "topk.csv"
    main(
        [
            "predict", "--config", str(CONFIGS / "cmnist" / "topk.yaml"), *tiny(run / "topk", data),
            "--model.init_args.weights", str(best), "--trainer.callbacks.init_args.output", str(output),
        ]
    )  # fmt: skip
    with output.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 100
    assert {label: sum(r["label"] == str(label) for r in rows) for label in range(10)} == dict.fromkeys(
        range(10), 10
    )
    indices = [int(r["index"]) for r in rows]
    assert len(set(indices)) == 100 and max(indices) < 3600  # embedded 1%: 3,600 training images
    summary = json.loads((run / "topk_summary.json").read_text())
    assert summary["num_scored"] == 3600
    train = module.train_eval_dataset  # the precision is the selection's true conflicting fraction
    assert [int(r["bias"]) for r in rows] == [int(train.biases[i]) for i in indices]
    truth = float(np.mean([train.labels[i] != train.biases[i] for i in indices]))
    assert summary["precision"] == pytest.approx(truth)


def write_manifest(
    folder: Path, n: int = 20, header: str = "index,content_index,style_index,label,path"
) -> Path:
    """A synthetic-set manifest like the inject stage's: PNGs in images/, paths relative to the CSV."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = [header]
    for i in range(n):
        image = (rng.random((28, 28, 3)) * 255).astype(np.uint8)
        Image.fromarray(image).save(folder / "images" / f"{i:05d}.png")
        lines.append(f"{i},{i},{i + 100},{i % 10},images/{i:05d}.png")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return folder / "manifest.csv"


def plain_ce_debias_config(tmp_path: Path) -> Path:
    """configs/cmnist/debias.yaml with the paper's plain-CE DebiasClassifier (CMNIST defaults to LfF).

    Selection on val/acc: the bias-model selection needs a trained bias stage (tested in test_classifiers).
    """
    config = yaml.safe_load((CONFIGS / "cmnist" / "debias.yaml").read_text())
    dropped = ("q", "alpha", "selection_bias")
    init = {k: v for k, v in config["model"]["init_args"].items() if k not in dropped}
    config["model"] = {"class_path": "DebiasClassifier", "init_args": {**init, "loss": "ce"}}
    path = tmp_path / "debias_ce.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_debias_trains_on_original_plus_manifest(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "inject")
    run = tmp_path / "debias"
    cli = main(
        [
            "fit", "--config", str(plain_ce_debias_config(tmp_path)), *tiny(run, tmp_path / "data"),
            "--data.init_args.synthetic_manifest", str(manifest),
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "1",
        ]
    )  # fmt: skip
    model, datamodule = cli.model, cli.datamodule
    assert (model.num_original, model.num_synthetic) == (3600, 20)
    synthetic = datamodule.train_dataset[3600 + 7]
    assert synthetic["index"] == 3607 and synthetic["bias"] == -1 and synthetic["label"] == 7
    assert synthetic["image"].shape == (3, 28, 28) and float(synthetic["image"].max()) <= 1.0
    assert "train/synthetic_frac" in cli.trainer.callback_metrics
    checkpoint = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    assert checkpoint["diffinject"]["num_synthetic"] == 20


@pytest.mark.parametrize("control", ["uniform_colour", "shuffle_labels"])
def test_debias_synthetic_control_from_the_cli(tmp_path: Path, control: str) -> None:
    """The study's control variants set `data.init_args.synthetic_control` on the debias config."""
    manifest = write_manifest(tmp_path / "inject")
    cli = main(
        [
            "fit", "--config", str(plain_ce_debias_config(tmp_path)), *tiny(tmp_path / "run", tmp_path / "d"),
            "--data.init_args.synthetic_manifest", str(manifest),
            "--data.init_args.synthetic_control", control, "--trainer.fast_dev_run", "true",
        ]
    )  # fmt: skip
    datamodule = cli.datamodule
    assert datamodule.synthetic_control == control and len(datamodule.train_dataset) == 3620
    items = [datamodule.train_dataset[3600 + r] for r in range(20)]
    labels = [it["label"] for it in items]
    if control == "uniform_colour":
        assert labels == [r % 10 for r in range(20)]
        assert all(torch.equal(it["image"], it["image"][:, :1, :1].expand(3, 28, 28)) for it in items)
    else:
        assert sorted(labels) == sorted(r % 10 for r in range(20)) and labels != [r % 10 for r in range(20)]


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda m: m.unlink(), FileNotFoundError, "does not exist"),
        (lambda m: m.write_text("index,label\n0,1\n"), ValueError, "lacks column"),
        (lambda m: m.write_text("index,label,path\n0,12,images/00000.png\n"), ValueError, "outside"),
        (
            lambda m: m.write_text("index,label,path\n0,1,images/missing.png\n"),
            FileNotFoundError,
            "missing.png",
        ),
    ],
)
def test_debias_bad_manifest_fails_clearly(tmp_path: Path, mutate, error: type, match: str) -> None:
    manifest = write_manifest(tmp_path / "inject", n=2)
    mutate(manifest)
    with pytest.raises(error, match=match):
        main(
            [
                "fit", "--config", str(CONFIGS / "cmnist" / "debias.yaml"),
                *tiny(tmp_path / "run", tmp_path / "d"),
                "--data.init_args.synthetic_manifest", str(manifest), "--trainer.fast_dev_run", "true",
            ]
        )  # fmt: skip


def test_debias_corrupt_image_fails_clearly(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "inject", n=2)
    (tmp_path / "inject" / "images" / "00001.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match="00001.png"):
        main(
            [
                "fit", "--config", str(CONFIGS / "cmnist" / "debias.yaml"),
                *tiny(tmp_path / "run", tmp_path / "d"),
                "--data.init_args.synthetic_manifest", str(manifest), "--trainer.fast_dev_run", "true",
                "--data.init_args.batch_size", "4000", "--model.init_args.selection_bias", "null",
            ]
        )  # fmt: skip


def test_cmnist_selection_without_a_bias_stage_names_the_missing_checkpoint(tmp_path: Path) -> None:
    expected = "bias/checkpoints/best.ckpt not found: run the bias fit stage"
    with pytest.raises(FileNotFoundError, match=expected):
        main(
            [
                "fit", "--config", str(CONFIGS / "cmnist" / "vanilla.yaml"),
                *tiny(tmp_path / "run", tmp_path / "d"),
                "--model.init_args.selection_bias", str(tmp_path / "bias" / "checkpoints" / "best.ckpt"),
                "--trainer.fast_dev_run", "true",
            ]
        )  # fmt: skip
