"""A² baseline stages end to end on embedded Colored MNIST with tiny networks (8-px model space, width 4).

The shipped configs run through the CLI with every `runs/...` path moved under a temp folder and the sizes
shrunk: the source GAN fits 3 iterations and exports, the adaptation loads that export, the translation
inverts and renders 18 images. A bias model is trained for a few Adam steps in the fixture (plain CE on the
99 %-aligned split learns the colour), so "pseudo-aligned" means what it does in a real run.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffinject.cli import main
from diffinject.data import CMNISTDataModule
from diffinject.data.synthetic import read_synthetic_manifest
from diffinject.data.topk_images import TopKImagesDataModule
from diffinject.diffusion import to_model_space
from diffinject.nets import build_classifier
from diffinject.nets.gan_fast import FastGenerator
from diffinject.nets.gan_style import StyleDiscriminator, StyleGenerator
from diffinject.stages import A2Adaptation, A2Translate, AmpliBiasGenerate
from diffinject.stages.a2_inversion import invert
from diffinject.stages.a2_translate import A2TranslateDataModule, class_probabilities
from diffinject.stages.gan_export import GAN_INFO, GAN_WEIGHTS, load_gan_export, save_gan_export
from inject_helpers import write_topk

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_GAN = ["--model.init_args.r1_every", "2", "--model.init_args.sample_every_n_steps", "2",
            "--model.init_args.num_samples", "4"]  # fmt: skip
TINY_SOURCE = [
    "--model.init_args.model_size",
    "8",
    "--model.init_args.width",
    "4",
    "--model.init_args.max_width",
    "8",
    "--model.init_args.z_dim",
    "8",
    "--model.init_args.w_dim",
    "8",
    "--model.init_args.mapping_layers",
    "1",
    *TINY_GAN,
]
RATIO = 0.005  # 18 of the 3,600 embedded training digits


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _redirect(name: str, root: Path) -> Path:
    """A shipped CMNIST config with its runs/ paths moved under `root`."""
    out = root / f"{name}.yaml"
    out.write_text((CONFIGS / "cmnist" / f"{name}.yaml").read_text().replace("runs/", f"{root}/runs/"))
    return out


def _run(command: str, name: str, root: Path, *extra: str):
    return main(
        [
            command, "--config", str(_redirect(name, root)),
            "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *_data_args(name, root), *extra,
        ]
    )  # fmt: skip


def _data_args(name: str, root: Path) -> list[str]:
    prefix = "--data.init_args" if name == "a2_source" else "--data.init_args.data.init_args"
    return [f"{prefix}.root", str(root / "data"), f"{prefix}.source", "embedded"]


def _runs(root: Path) -> Path:
    return root / "runs/cmnist/1pct"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Top-K file, a briefly trained bias model and the source GAN (3 iterations, through the CLI)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("a2")
    data = CMNISTDataModule(root=str(root / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    bias = _runs(root) / "bias"
    (bias / "checkpoints").mkdir(parents=True)
    write_topk(bias / "topk.csv", train.labels, train.biases, k=2)
    torch.manual_seed(0)
    net = build_classifier("mlp", 10, 3, 28)
    images, labels = (
        torch.stack([train[i]["image"] for i in range(len(train))]),
        torch.as_tensor(train.labels),
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(60):
        batch = torch.randint(0, len(labels), (256,))
        loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hparams = {"arch": "mlp", "num_classes": 10, "in_channels": 3, "image_size": 28}
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, bias / "checkpoints/best.ckpt")
    cli = _run(
        "fit", "a2_source", root, "--trainer.max_steps", "3", "--data.init_args.batch_size", "8", *TINY_SOURCE
    )
    assert cli.trainer.global_step == 3
    return root


@pytest.fixture(scope="module")
def adapted(workdir: Path):
    """The adaptation through the CLI: 3 iterations on the pooled top-K, consistency term on."""
    return _run(
        "fit", "a2_adapt", workdir, "--trainer.max_steps", "3", "--data.init_args.batch_size", "4", *TINY_GAN
    )


def test_source_fit_exports_ema_generator_and_grid(workdir: Path) -> None:
    run = _runs(workdir) / "a2_source"
    export = load_gan_export(run / "generator", StyleGenerator, discriminator_class=StyleDiscriminator)
    info = export.info
    assert info["global_step"] == 3 and info["stage"] == "a2_source" and info["weights"] == "ema"
    assert (info["image_size"], info["channels"], info["model_size"]) == (28, 3, 8)
    assert info["generator_class"] == "StyleGenerator" and info["generator_args"] == {
        "model_size": 8, "channels": 3, "z_dim": 8, "w_dim": 8, "mapping_layers": 1,
        "width": 4, "max_width": 8,
    }  # fmt: skip
    assert export.discriminator is not None and (run / "checkpoints" / "last.ckpt").is_file()
    assert export.generator(torch.randn(2, 8)).shape == (2, 3, 8, 8)
    events = EventAccumulator(str(sorted(run.glob("events.out.tfevents.*"))[-1]), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples/a2_source_ema")] == [2, 3]


def test_source_resumes_step_count_and_ema(workdir: Path, tmp_path: Path) -> None:
    tiny = ["--data.init_args.batch_size", "8", *TINY_SOURCE, "--data.init_args.root", str(workdir / "data")]
    _run("fit", "a2_source", tmp_path, "--trainer.max_steps", "2", *tiny)
    resumed = _run("fit", "a2_source", tmp_path, "--trainer.max_steps", "4", "--ckpt_path", "last", *tiny)
    assert resumed.trainer.global_step == 4 and int(resumed.model.ema_updates) == 4
    assert (
        load_gan_export(_runs(tmp_path) / "a2_source" / "generator", StyleGenerator).info["global_step"] == 4
    )


def test_adaptation_trains_the_target_not_the_source(workdir: Path, adapted) -> None:
    source = load_gan_export(_runs(workdir) / "a2_source" / "generator", StyleGenerator)
    model = adapted.model
    assert adapted.trainer.global_step == 3 and model.consistency_evaluations == 3
    for name, value in source.generator.state_dict().items():
        assert torch.equal(model.source_generator.state_dict()[name], value), name
    changed = [
        n
        for n, v in model.generator.state_dict().items()
        if not torch.equal(v, source.generator.state_dict()[n])
    ]
    assert changed and not any(n.startswith("mapping.") for n in changed)  # W stays shared
    export = load_gan_export(_runs(workdir) / "a2_adapt" / "generator", StyleGenerator)
    assert export.info["source"]["generator_sha256"] == source.generator_sha256
    assert export.info["stage"] == "a2_adapt" and export.info["topk_images"] == 20  # K = 2 × 10 classes
    assert export.info["consistency_weight"] == 1000.0


def test_zero_consistency_weight_never_computes_the_term(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the consistency loss was computed with consistency_weight 0")

    monkeypatch.setattr("diffinject.stages.a2_adapt.distance_consistency_loss", forbidden)
    cli = _run(
        "fit", "a2_adapt", workdir, "--trainer.max_steps", "2", "--data.init_args.batch_size", "4", *TINY_GAN,
        "--model.init_args.consistency_weight", "0",
        "--model.init_args.export_dir", str(tmp_path / "control"),
        "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.logger", "false",
        "--trainer.callbacks", "[]",
    )  # fmt: skip
    assert cli.model.consistency_evaluations == 0
    assert "train/consistency" not in cli.trainer.logged_metrics
    assert load_gan_export(tmp_path / "control", StyleGenerator).info["consistency_weight"] == 0.0


def test_consistency_term_is_zero_until_the_target_moves(workdir: Path) -> None:
    model = A2Adaptation(str(_runs(workdir) / "a2_source" / "generator"), image_size=28, channels=3)
    torch.manual_seed(0)
    at_start = float(model.extra_generator_loss()["consistency"].detach())  # 1000 × KL(P ‖ P) = 0
    with torch.no_grad():
        for conv in model.generator.convs[1:]:
            conv.weight.add_(torch.randn_like(conv.weight))
    moved = float(model.extra_generator_loss()["consistency"].detach())
    assert at_start < 1e-3 < moved and at_start < 1e-3 * moved  # float32 rounding × 1000 at the start


def test_inversion_reduces_its_loss(workdir: Path) -> None:
    generator = load_gan_export(_runs(workdir) / "a2_source" / "generator", StyleGenerator).generator
    start = generator.mean_w(256, generator=torch.Generator().manual_seed(0))
    reachable = generator(torch.randn(6, 8, generator=torch.Generator().manual_seed(1)))
    result = invert(generator, reachable, start, steps=60, lr=0.1)
    assert (result.loss_final < 0.5 * result.loss_initial).all()
    data = CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    digits = to_model_space(torch.stack([data.train_eval_dataset[i]["image"] for i in range(6)]), 8)
    real = invert(generator, digits, start, steps=30, lr=0.1)
    assert real.loss_final.mean() < real.loss_initial.mean() and real.w.shape == (6, 8)


def _manifest(run: Path) -> list[dict[str, str]]:
    with (run / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_translate_writes_a_resumable_manifest_of_pseudo_aligned_images(workdir: Path, adapted) -> None:
    run = _runs(workdir) / "a2_translate"
    tiny = ["--data.init_args.ratio", str(RATIO), "--data.init_args.batch_size", "5",
            "--model.init_args.inversion_steps", "10", "--model.init_args.grid_samples", "3"]  # fmt: skip
    cli = _run("predict", "a2_translate", workdir, *tiny)
    rows = _manifest(run)
    n = round(RATIO * 3600)
    assert [int(r["index"]) for r in rows] == list(range(n)) and {r["style_index"] for r in rows} == {"-1"}
    manifest = read_synthetic_manifest(run / "manifest.csv", 10, content_index=True)
    source = cli.datamodule.source
    contents = manifest.content_indices
    assert len(set(contents.tolist())) == n
    assert manifest.labels.tolist() == [int(source.labels[c]) for c in contents]
    with (_runs(workdir) / "bias" / "topk.csv").open() as handle:
        topk = {int(r["index"]) for r in csv.DictReader(handle)}
    assert not topk & set(contents.tolist())
    net = build_classifier("mlp", 10, 3, 28)
    state = torch.load(_runs(workdir) / "bias/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    net.load_state_dict({k[4:]: v for k, v in state.items()})
    probs = class_probabilities(net, source)[contents]
    assert (probs.argmax(1) == manifest.labels).all() and (probs[np.arange(n), manifest.labels] >= 0.9).all()
    with Image.open(run / rows[0]["path"]) as image:
        assert image.size == (28, 28) and image.mode == "RGB"
    losses = list(csv.DictReader((run / "inversion_losses.csv").open()))
    assert sum(int(r["num_images"]) for r in losses) == n
    summary = json.loads((run / "translate_info.json").read_text())
    assert summary["selection"]["translated"] == n and summary["inversion"]["images"] == n
    debias = CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01,
                              synthetic_manifest=str(run / "manifest.csv"))  # fmt: skip
    debias.setup("fit")
    assert len(debias.train_dataset) == 3600 + n
    events = EventAccumulator(str(sorted(run.glob("events.out.tfevents.*"))[-1]), size_guidance={"images": 0})
    events.Reload()
    assert "a2/image_reconstruction_translation" in events.Tags()["images"]

    before = {
        p.name: (p.stat().st_mtime_ns, np.asarray(Image.open(p))) for p in (run / "images").glob("*.png")
    }
    _run("predict", "a2_translate", workdir, *tiny)  # nothing left: nothing written
    assert {p.name: p.stat().st_mtime_ns for p in (run / "images").glob("*.png")} == {
        k: v[0] for k, v in before.items()
    }
    assert _manifest(run) == rows
    for lost in ("3.png", "16.png"):  # an interrupted run: two images and the merged manifest missing
        (run / "images" / lost).unlink()
    (run / "manifest.csv").unlink()
    _run("predict", "a2_translate", workdir, *tiny)
    assert _manifest(run) == rows
    for lost in ("3.png", "16.png"):  # remade alone in a padded batch: the same pixels
        assert np.array_equal(np.asarray(Image.open(run / "images" / lost)), before[lost][1])


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_or_incomplete_export_names_the_file(workdir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"nowhere/generator/{GAN_INFO} not found .*a2_source\.yaml"):
        A2Adaptation(str(tmp_path / "nowhere" / "generator"))
    broken = tmp_path / "generator"
    shutil.copytree(_runs(workdir) / "a2_source" / "generator", broken)
    (broken / GAN_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{broken / GAN_WEIGHTS} not found"):
        A2Adaptation(str(broken))


def test_wrong_shaped_export_names_the_file(workdir: Path, tmp_path: Path) -> None:
    export = tmp_path / "generator"
    shutil.copytree(_runs(workdir) / "a2_source" / "generator", export)
    info = json.loads((export / GAN_INFO).read_text())
    info["generator_args"]["width"] = 8  # the weights were saved at width 4
    (export / GAN_INFO).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=rf"{export / GAN_WEIGHTS} does not fit .*shape mismatches"):
        A2Adaptation(str(export))
    with pytest.raises(
        ValueError, match=rf"a2_source/generator/{GAN_INFO}: the export has channels=3.*channels=1"
    ):
        A2Adaptation(str(_runs(workdir) / "a2_source" / "generator"), channels=1)


def test_export_of_another_kind_or_stage_is_refused_naming_it(workdir: Path, adapted, tmp_path: Path) -> None:
    args = {"model_size": 16, "channels": 3, "nz": 8, "width": 4, "max_width": 16}
    info = {
        "stage": "amplibias_gan",
        "generator_args": args,
        "model_size": 16,
        "channels": 3,
        "image_size": 28,
    }
    fast = save_gan_export(FastGenerator(**args), tmp_path / "amplibias_gan", info)
    source, adapted_dir = (_runs(workdir) / stage / "generator" for stage in ("a2_source", "a2_adapt"))
    wrong_class = rf"{fast / GAN_INFO}: holds a FastGenerator generator .*a StyleGenerator was expected"
    with pytest.raises(ValueError, match=wrong_class):
        A2Adaptation(str(fast))
    with pytest.raises(ValueError, match=wrong_class):
        A2Translate(str(source), str(fast))
    with pytest.raises(
        ValueError, match=rf"{adapted_dir / GAN_INFO}: written by stage 'a2_adapt'.*a2_source"
    ):
        A2Adaptation(str(adapted_dir))  # an adapted generator is no source
    with pytest.raises(ValueError, match=rf"{source / GAN_INFO}: holds a StyleGenerator .*FastGenerator"):
        AmpliBiasGenerate(str(source))


def _topk_module(workdir: Path, topk: Path) -> TopKImagesDataModule:
    data = CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01)
    return TopKImagesDataModule(data, str(topk))


def test_empty_topk_class_or_file_names_topk_csv(workdir: Path, tmp_path: Path) -> None:
    lines = (_runs(workdir) / "bias" / "topk.csv").read_text().splitlines()
    no_three = tmp_path / "topk.csv"
    no_three.write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split(",")[1] != "3"]) + "\n")
    with pytest.raises(ValueError, match=rf"{no_three} has no rows for class\(es\) \[3\]"):
        _topk_module(workdir, no_three).setup("fit")
    no_three.write_text(lines[0] + "\n")
    with pytest.raises(ValueError, match=rf"{no_three} has no rows"):
        _topk_module(workdir, no_three).setup("fit")
    data = CMNISTDataModule(root=str(workdir / "data"), source="embedded", ratio=0.01)
    translate = A2TranslateDataModule(data, str(no_three), str(_runs(workdir) / "bias/checkpoints/best.ckpt"))
    with pytest.raises(ValueError, match=rf"{no_three} has no rows"):
        translate.setup("predict")
