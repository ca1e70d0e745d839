"""benchmarks/oracle_synthetic.py: the perfect generator's images (content stroke, style palette colour)."""

from __future__ import annotations

import csv
import importlib
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import yaml
from PIL import Image

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS
from diffinject.data import CMNISTDataModule
from diffinject.data.cmnist import LFF_COLORS

REPO = Path(__file__).resolve().parents[1]
DARK = 8  # the one palette colour whose brightest channel (0.39) rounds a stroke value of 1 to black


@pytest.fixture
def oracle(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when the script runs: its siblings import
    return importlib.import_module("oracle_synthetic")


@pytest.fixture(scope="module")
def data() -> CMNISTDataModule:
    module = CMNISTDataModule(source="embedded")
    module.setup("fit")
    return module


def pick_rows(data: CMNISTDataModule) -> list[dict[str, int]]:
    """Four (content, style) pairs: one bias-conflicting content, styles of four other bias colours."""
    labels, biases = data.train_eval_dataset.labels, data.train_eval_dataset.biases
    bright = np.flatnonzero(biases != DARK)
    contents = [int(bright[labels[bright] != biases[bright]][0]), *map(int, bright[[0, 500, 2000]])]
    rows, used = [], set()
    for r, content in enumerate(contents):
        style = next(
            int(i)
            for i in bright
            if biases[i] not in used | {biases[content]} and labels[i] != labels[content]
        )
        used.add(biases[style])
        rows.append({
            "index": 10 + r, "content_index": content, "style_index": style, "label": int(labels[content]),
            "content_label": int(labels[content]), "style_label": int(labels[style]),
            "content_bias": int(biases[content]), "style_bias": int(biases[style]),
        })  # fmt: skip
    return rows


def fake_run(root: Path, rows: list[dict[str, int]]) -> Path:
    """runs/cmnist/1pct with seed0/inject/manifest.csv (placeholder PNGs) and seed0/debias/pipeline_config."""
    run = root / "runs" / "cmnist" / "1pct"
    inject, debias = run / "seed0" / "inject", run / "seed0" / "debias"
    (inject / "images").mkdir(parents=True)
    for row in rows:
        row["path"] = f"images/{row['index']}.png"
        Image.fromarray(np.zeros((28, 28, 3), dtype=np.uint8)).save(inject / row["path"])
    with (inject / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    config = yaml.safe_load((REPO / "configs" / "cmnist" / "debias.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(debias)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(run / "seed0")
    config["model"]["init_args"]["selection_bias"] = str(run / "seed0" / "bias" / "checkpoints" / "best.ckpt")
    init = config["data"]["init_args"]
    init.update(source="embedded", root=str(root / "data"), synthetic_manifest=str(inject / "manifest.csv"))
    debias.mkdir(parents=True)
    (debias / "pipeline_config.yaml").write_text(yaml.safe_dump(config))
    return run


def read_manifest(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


def test_oracle_images_have_the_style_colour_and_the_content_shape(
    tmp_path: Path, oracle: ModuleType, data: CMNISTDataModule
) -> None:
    rows = pick_rows(data)
    run = fake_run(tmp_path, rows)
    result = oracle.main(["--run", str(run), "--seed", "0", "--check"])
    out = run / "seed0" / "oracle" / "inject"
    assert result["rows"] == result["rendered"] == 4 and result["strokes"] == "mnist"
    assert result["oracle_manifest"] == str(out / "manifest.csv")
    assert result["check"]["colour_is_style_colour"] == 1.0
    assert result["check"]["foreground_equals_content"] == 1.0
    header, written = read_manifest(out / "manifest.csv")
    assert header == list(MANIFEST_COLUMNS)
    train = data.train_eval_dataset
    grey = data.grey_digits("train")
    for row, got in zip(rows, written, strict=True):
        assert {k: str(v) for k, v in row.items() if k != "path"} == {k: got[k] for k in row if k != "path"}
        image = np.asarray(Image.open(out / got["path"]).convert("RGB")).transpose(2, 0, 1).astype(float)
        content = train.images[row["content_index"]].numpy()
        assert np.array_equal(image.max(axis=0) > 0, content.max(axis=0) > 0)  # the content's shape
        stroke = grey[row["content_index"]].astype(float)
        colour = (image * stroke).sum(axis=(1, 2)) / (stroke**2).sum()  # least-squares colour of the stroke
        assert (
            np.abs(colour - LFF_COLORS[row["style_bias"]]).max() < 0.03
        )  # the style's, with σ = 0.005 noise
        assert np.abs(colour - LFF_COLORS[row["content_bias"]]).max() > 0.1
        assert np.abs(image - np.rint(stroke[None] * colour[:, None, None])).max() <= 1
    again = oracle.main(["--run", str(run), "--seed", "0"])
    assert again["rendered"] == 0  # resumable: nothing to redo
    served = CMNISTDataModule(source="embedded", synthetic_manifest=str(out / "manifest.csv"))
    served.setup("fit")
    assert len(served.train_dataset) == 3604  # the oracle manifest reads as a synthetic set


def test_a_manifest_for_other_data_is_refused(
    tmp_path: Path, oracle: ModuleType, data: CMNISTDataModule
) -> None:
    rows = pick_rows(data)
    rows[2]["style_bias"] = (rows[2]["style_bias"] + 1) % 10
    run = fake_run(tmp_path, rows)
    with pytest.raises(ValueError, match=r"manifest.csv, line 4: style_bias .* another dataset"):
        oracle.main(["--run", str(run), "--seed", "0"])


def test_strokes_recovered_from_colour(oracle: ModuleType, data: CMNISTDataModule) -> None:
    """The folder source's fallback: the stroke from the coloured image alone, within rounding."""
    picked = np.flatnonzero(data.train_eval_dataset.biases != DARK)[:50]
    recovered = oracle.recover_strokes(data.train_eval_dataset.images[picked].numpy()).astype(int)
    assert np.abs(recovered - data.grey_digits("train")[picked].astype(int)).max() <= 2


def test_fit_config_and_commands_mirror_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    fit = importlib.import_module("oracle_fit")
    run = fake_run(tmp_path, [{"index": 0}])
    config = yaml.safe_load((run / "seed0" / "debias" / "pipeline_config.yaml").read_text())
    folder = run / "seed0" / "oracle" / "debias"
    oracle_manifest = run / "seed0" / "oracle" / "inject" / "manifest.csv"
    resolved = fit.oracle_config(config, oracle_manifest, folder)
    assert resolved["trainer"]["default_root_dir"] == str(folder)
    assert resolved["trainer"]["logger"]["init_args"] == {
        "save_dir": str(folder.parent),
        "name": "debias",
        "version": "",
    }
    init = resolved["data"]["init_args"]
    assert init["synthetic_manifest"] == str(oracle_manifest) and init["synthetic_control"] == "none"
    assert resolved["model"] == config["model"] and init["root"] == config["data"]["init_args"]["root"]
    trainer = REPO / "configs" / "trainer" / "cpu.yaml"
    fit_cmd, test_best, test_last = fit.commands(folder, trainer, 3)
    common = [
        "--config",
        str(folder / "pipeline_config.yaml"),
        "--trainer",
        str(trainer),
        "--seed_everything",
        "3",
    ]
    assert fit_cmd == ["fit", *common]
    assert test_best == ["test", *common, "--ckpt_path", str(folder / "checkpoints" / "best.ckpt")]
    assert test_last[:7] == ["test", *common] and test_last[-1] == str(folder / "checkpoints" / "last.ckpt")
    assert test_last[test_last.index("--trainer.default_root_dir") + 1] == str(folder / "last_epoch")


@pytest.mark.slow
def test_fit_runs_the_debias_stage_on_the_oracle_set(
    tmp_path: Path, oracle: ModuleType, data: CMNISTDataModule
) -> None:
    """--fit end to end (three CLI subprocesses, one short epoch), then skipped when asked again."""
    run = fake_run(tmp_path, pick_rows(data))
    path = run / "seed0" / "debias" / "pipeline_config.yaml"
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=1)
    del config["model"]["init_args"]["selection_bias"]  # the fake run has no bias stage
    path.write_text(yaml.safe_dump(config))
    result = oracle.main(["--run", str(run), "--seed", "0", "--fit"])
    folder = run / "seed0" / "oracle" / "debias"
    assert (folder / "metrics.json").is_file() and (folder / "last_epoch" / "metrics.json").is_file()
    assert result["oracle"]["skipped"] is False and result["debias"]["selected"] is None
    for block in ("selected", "last_epoch"):
        assert set(result["oracle"][block]) == {"overall", "aligned", "conflicting", "epoch"}
        assert 0.0 <= result["oracle"][block]["overall"] <= 1.0
    resolved = yaml.safe_load((folder / "pipeline_config.yaml").read_text())
    assert resolved["data"]["init_args"]["synthetic_manifest"] == result["oracle_manifest"]
    assert not (run / "seed0" / "debias" / "checkpoints").exists()  # the seed's own stage is untouched
    assert oracle.main(["--run", str(run), "--seed", "0", "--fit"])["oracle"]["skipped"] is True
