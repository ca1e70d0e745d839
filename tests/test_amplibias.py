"""AmpliBias's two stages on embedded Colored MNIST with tiny networks (16 px model space, a few steps).

The fit stage runs through the CLI once per module (`fitted`); the generate tests read its export. Checks are
against independent computations: the label rule is recomputed from the written PNGs with numpy, the
memorisation mean from the PNGs by hand. The pieces without the CLI: tests/test_amplibias_parts.py.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS
from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from diffinject.data.synthetic import read_synthetic_manifest
from diffinject.data.topk_images import TopKImagesDataModule, TopKPool
from diffinject.nets.gan_fast import FastGenerator
from diffinject.stages.amplibias_generate import AmpliBiasGenerate
from diffinject.stages.gan_export import GAN_INFO, GAN_WEIGHTS, load_gan_export, save_gan_export
from inject_helpers import write_topk

K = 2  # top-K per class: 20 digits
RATIO = 0.005  # 18 samples of the 3,600 embedded training digits
TINY = {"model_size": 16, "nz": 8, "g_width": 4, "d_width": 4, "max_width": 16}
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cmnist"
SHIPPED = ("amplibias_gan", "amplibias_generate")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _cmnist(root: Path) -> dict[str, Any]:
    return {"class_path": "CMNISTDataModule", "init_args": {"root": str(root / "data"), "source": "embedded"}}


def _fit_config(root: Path, out: str = "amplibias", topk: str = "bias/topk.csv", **model: Any) -> Path:
    run = root / out
    config = {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 3, "default_root_dir": str(run),
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root), "name": out, "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True},
                }
            ],
        },
        "model": {
            "class_path": "AmpliBiasGAN",
            "init_args": {
                **TINY, "sample_every_n_steps": 2, "num_samples": 4, "calibration_batches": 2,
                "export_dir": str(run / "generator"), **model,
            },
        },
        "data": {
            "class_path": "diffinject.data.topk_images.TopKImagesDataModule",
            "init_args": {
                "data": _cmnist(root), "topk": str(root / topk), "batch_size": 4, "iterations_per_epoch": 2,
            },
        },
    }  # fmt: skip
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _generate_config(root: Path, out: str, export: str = "amplibias/generator", seed: int = 0) -> Path:
    run = root / out
    config = {
        "return_predictions": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "default_root_dir": str(run), "enable_progress_bar": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root), "name": out, "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "diffinject.callbacks.amplibias_writer.AmpliBiasWriter",
                    "init_args": {"output_dir": str(run), "grid_samples": 4},
                }
            ],
        },
        "model": {
            "class_path": "AmpliBiasGenerate",
            "init_args": {"generator": str(root / export), "micro_batch": 4},
        },
        "data": {
            "class_path": "diffinject.data.topk_images.GeneratorSamplesDataModule",
            "init_args": {
                "data": _cmnist(root), "topk": str(root / "bias/topk.csv"), "ratio": RATIO, "seed": seed,
                "batch_size": 5,
            },
        },
    }  # fmt: skip
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("amplibias")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    (root / "bias").mkdir()
    write_topk(root / "bias/topk.csv", train.labels, train.biases, k=K)
    torch.set_num_threads(1)
    cli = main(["fit", "--config", str(_fit_config(root))])
    return root, cli


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64) / 255.0


# ------------------------------------------------------------------------------------------------- fit
def test_fit_through_cli_exports_the_ema_generator(fitted: tuple[Path, Any]) -> None:
    root, cli = fitted
    assert cli.trainer.global_step == 3  # iterations, not optimiser calls (D's step is not counted)
    export = root / "amplibias/generator"
    info = json.loads((export / GAN_INFO).read_text())
    assert (info["model_size"], info["channels"], info["image_size"], info["global_step"]) == (16, 3, 28, 3)
    assert info["generator_args"]["width"] == 4 and info["weights"] == "ema"
    assert (info["stage"], info["generator_class"]) == ("amplibias_gan", "FastGenerator")
    assert info["topk"]["num_images"] == 10 * K and info["topk"]["per_class"] == [K] * 10
    net = load_gan_export(export, FastGenerator).generator
    for key, value in cli.model.ema_generator.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(cli.model.ema_generator.to_image[0].parametrizations.weight.original,
                           cli.model.generator.to_image[0].parametrizations.weight.original)  # fmt: skip
    events = sorted((root / "amplibias").glob("events.out.tfevents*"))
    accumulator = EventAccumulator(str(events[-1]), size_guidance={"images": 0})
    accumulator.Reload()
    assert {"amplibias/samples_ema", "amplibias/topk_real"} <= set(accumulator.Tags()["images"])
    assert [e.step for e in accumulator.Images("amplibias/samples_ema")] == [2, 3]
    assert "train/rec" in accumulator.Tags()["scalars"]


def test_fit_resumes_from_last_checkpoint(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    config = _fit_config(root, out="amplibias_resume", max_width=8)
    main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    resumed = main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert resumed.trainer.global_step == 4
    assert json.loads((root / "amplibias_resume/generator" / GAN_INFO).read_text())["global_step"] == 4


def test_shipped_configs_run_and_hand_over_the_export(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    fit_cfg, gen_cfg = (yaml.safe_load((CONFIGS / f"{n}.yaml").read_text()) for n in SHIPPED)
    run = fit_cfg["trainer"]["default_root_dir"]
    assert (
        fit_cfg["model"]["init_args"]["export_dir"]
        == f"{run}/generator"
        == gen_cfg["model"]["init_args"]["generator"]
    )
    assert (
        gen_cfg["trainer"]["callbacks"][0]["init_args"]["output_dir"]
        == gen_cfg["trainer"]["default_root_dir"]
    )
    for key in ("topk", "k", "k_source"):
        assert fit_cfg["data"]["init_args"][key] == gen_cfg["data"]["init_args"][key]
    for name in SHIPPED:  # both parse and run, redirected into tmp with tiny sizes
        text = (CONFIGS / f"{name}.yaml").read_text().replace("runs/", f"{root}/shipped/runs/")
        (root / f"shipped_{name}.yaml").write_text(text.replace("root: data", f"root: {root}/data"))
    data = [
        "--data.init_args.data.init_args.source",
        "embedded",
        "--data.init_args.topk",
        str(root / "bias/topk.csv"),
    ]
    tiny = [
        f"--model.init_args.{k}={v}" for k, v in {**TINY, "num_samples": 2, "calibration_batches": 1}.items()
    ]
    main(
        [
            "fit",
            "--config",
            str(root / "shipped_amplibias_gan.yaml"),
            "--trainer.max_steps",
            "1",
            *data,
            *tiny,
        ]
    )
    main(
        [
            "predict",
            "--config",
            str(root / "shipped_amplibias_generate.yaml"),
            "--data.init_args.ratio",
            "0.002",
            *data,
        ]
    )
    assert len(_rows(root / "shipped/runs/cmnist/1pct/amplibias_generate")) == 7


def test_fit_refuses_data_other_than_the_topk(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    config = yaml.safe_load(_fit_config(root, out="amplibias_plain").read_text())
    config["data"] = _cmnist(root)
    (root / "plain.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(TypeError, match="top-K images only"):
        main(["fit", "--config", str(root / "plain.yaml")])


@pytest.mark.parametrize("drop", ["class", "all"])
def test_topk_without_a_class_or_rows_is_an_error_naming_it(fitted: tuple[Path, Any], drop: str) -> None:
    root, _ = fitted
    with (root / "bias/topk.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    bad = root / f"topk_{drop}.csv"
    with bad.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([r for r in rows if r["label"] != "3"] if drop == "class" else [])
    dm = TopKImagesDataModule(CMNISTDataModule(root=str(root / "data"), source="embedded"), str(bad))
    match = r"no rows for class\(es\) \[3\]" if drop == "class" else "has no rows"
    with pytest.raises(ValueError, match=match) as error:
        dm.setup("fit")
    assert str(bad) in str(error.value)


# -------------------------------------------------------------------------------------------- generate
def test_generate_writes_a_labelled_set_the_debias_stage_reads(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    run = root / "generate"
    cli = main(["predict", "--config", str(_generate_config(root, "generate"))])
    rows = _rows(run)
    pool = cli.datamodule.pool
    n = int(RATIO * pool.num_train)
    assert list(rows[0]) == list(MANIFEST_COLUMNS) and [int(r["index"]) for r in rows] == list(range(n))
    train = cli.datamodule.data.train_eval_dataset
    topk = {int(i): train[int(i)]["image"].double().numpy() for i in pool.indices}
    for r in rows:
        content = int(r["content_index"])
        assert content in topk and int(r["label"]) == int(train.labels[content]) == int(r["content_label"])
        assert (r["style_index"], r["style_label"], r["path"]) == ("-1", "-1", f"images/{r['index']}.png")
        sample = _pixels(run / r["path"]).transpose(2, 0, 1)
        dists = {i: np.sqrt(((sample - img) ** 2).sum()) for i, img in topk.items()}
        assert content == min(dists, key=lambda i: (dists[i], i))  # the label rule, by hand

    manifest = read_synthetic_manifest(run / "manifest.csv", num_classes=10, content_index=True)
    assert len(manifest.indices) == n and set(manifest.content_indices.tolist()) <= set(topk)
    debias = CMNISTDataModule(
        root=str(root / "data"), source="embedded", synthetic_manifest=str(run / "manifest.csv"),
        synthetic_control="content_copy",
    )  # fmt: skip
    debias.setup("fit")
    assert len(debias.train_dataset) == pool.num_train + n

    memo = json.loads((run / "memorisation.json").read_text())
    assert memo["num_samples"] == n and memo["num_topk"] == 10 * K and memo["complete"]
    by_hand = [
        min(
            np.sqrt(((_pixels(run / r["path"]).transpose(2, 0, 1) - img) ** 2).mean())
            for img in topk.values()
        )
        for r in rows
    ]
    assert memo["samples_to_nearest_topk"]["mean"] == pytest.approx(np.mean(by_hand), rel=1e-6)
    assert sum(memo["label_counts"].values()) == n

    # a rerun has nothing left to do and changes nothing
    mtimes = {r["path"]: (run / r["path"]).stat().st_mtime_ns for r in rows}
    main(["predict", "--config", str(_generate_config(root, "generate"))])
    assert _rows(run) == rows
    assert {p: (run / p).stat().st_mtime_ns for p in mtimes} == mtimes


def test_interrupted_generate_completes_without_duplicates(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    main(["predict", "--config", str(_generate_config(root, "reference"))])
    reference = _rows(root / "reference")
    run = root / "interrupted"
    config = _generate_config(root, "interrupted")
    main(["predict", "--config", str(config), "--trainer.limit_predict_batches", "2"])  # stopped early
    partial = _rows(run)
    assert len(partial) == 10 and partial == reference[:10]
    (run / partial[3]["path"]).unlink()  # a lost image
    (run / "images/.7.png.tmp123").write_bytes(b"half")  # a kill's leftover
    with (run / "manifest.csv").open(
        "w", newline=""
    ) as handle:  # a lost row, and a stale shard duplicating one
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(partial[:5] + partial[6:])
    shutil.copy(run / "manifest.csv", run / "manifest.rank0.csv")

    main(["predict", "--config", str(config)])
    assert _rows(run) == reference  # no duplicate, no gap, the lost row re-labelled from its PNG
    assert not (run / "images/.7.png.tmp123").exists() and not list(run.glob("manifest.rank*.csv"))
    for r in reference:  # pixels do not depend on batching or on what a resume still had to make
        assert np.array_equal(_pixels(run / r["path"]), _pixels(root / "reference" / r["path"])), r["index"]

    with pytest.raises(ValueError, match="other settings .*seed"):
        main(["predict", "--config", str(_generate_config(root, "interrupted", seed=1))])


def test_missing_or_wrong_shaped_export_is_an_error_naming_the_file(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    with pytest.raises(FileNotFoundError, match=str(root / "nowhere" / GAN_INFO)):
        AmpliBiasGenerate(str(root / "nowhere"))

    export = root / "amplibias/generator"
    info = json.loads((export / GAN_INFO).read_text())
    wide = FastGenerator(**{**info["generator_args"], "width": 8})
    wrong = save_gan_export(wide, root / "wrong_shape", {k: v for k, v in info.items() if k != "format"})
    with pytest.raises(ValueError, match=rf"{wrong / GAN_WEIGHTS} does not fit .*shape mismatch"):
        AmpliBiasGenerate(str(wrong))

    gone = root / "no_weights"
    shutil.copytree(export, gone)
    (gone / GAN_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=str(gone / GAN_WEIGHTS)):
        AmpliBiasGenerate(str(gone))

    (gone / GAN_INFO).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{gone / GAN_INFO} is not valid JSON"):
        AmpliBiasGenerate(str(gone))


@pytest.mark.parametrize("change", ["image_size", "topk"])
def test_export_that_does_not_match_the_data_is_refused(fitted: tuple[Path, Any], change: str) -> None:
    root, _ = fitted
    export = root / f"mismatch_{change}"
    shutil.copytree(root / "amplibias/generator", export, dirs_exist_ok=True)
    info = json.loads((export / GAN_INFO).read_text())
    if change == "image_size":
        info["image_size"] = 32
    else:
        info["topk"]["sha256"] = "0" * 64
    (export / GAN_INFO).write_text(json.dumps(info))
    config = _generate_config(root, f"generate_{change}", export=export.name)
    match = "trained on image_size=32" if change == "image_size" else "another top-K"
    with pytest.raises(ValueError, match=match) as error:
        main(["predict", "--config", str(config)])
    assert str(export / GAN_INFO) in str(error.value)


# ------------------------------------------------------------------------------------------ label rule
def test_bias_feature_label_space_uses_the_penultimate_features(fitted: tuple[Path, Any]) -> None:
    root, _ = fitted
    from diffinject.nets import build_classifier

    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28)
    hparams = {"arch": "mlp", "num_classes": 10, "in_channels": 3, "image_size": 28}
    ckpt = root / "bias_fake.ckpt"
    torch.save(
        {"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}, "hyper_parameters": hparams},
        ckpt,
    )
    module = AmpliBiasGenerate(
        str(root / "amplibias/generator"), label_space="bias_features", bias_model=str(ckpt)
    )
    images = torch.rand(5, 3, 28, 28)
    module.pool = TopKPool(
        Path("t.csv"), np.array([3, 8, 40, 41, 99]), np.arange(5), np.zeros(5, int), images, 100
    )
    queries = (images[[4, 1, 2]] * 255).round().to(torch.uint8)
    features = torch.nn.Sequential(*list(net)[:-1])  # flatten → 3 × (linear, ReLU)
    expected = torch.cdist(features(queries.float() / 255), features(images)).argmin(dim=1)
    rows = module.label_rows([0, 1, 2], queries)
    assert [r["content_index"] for r in rows] == [int(module.pool.indices[p]) for p in expected]
    assert [r["label"] for r in rows] == expected.tolist()
