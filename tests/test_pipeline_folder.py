"""`DATASET=folder`: facts read from a generated tree, configs derived from them, the smoke pipeline end to
end, a given diffusion export instead of training one, and equality with `DATASET=cmnist` on an exported tree.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.data.inspect import inspect_folder
from diffinject.workflow import pipeline
from diffinject.workflow.configs import Options, stage_config
from diffinject.workflow.folder import diffusion_geometry, fill_config, template_set
from diffinject.workflow.pipeline import plan

REPO = Path(__file__).resolve().parents[1]


def write_tree(
    root: Path,
    name: str = "bars",
    pct: str = "5pct",
    classes: int = 3,
    aligned: int = 14,
    conflicting: int = 2,
    size: int = 16,
    mode: str = "L",
) -> Path:
    """Class = which third of the image holds a bar, bias = its brightness; DisEnt layout, valid and test."""
    rng = np.random.default_rng(0)
    index = 0

    def image(label: int, bias: int) -> Image.Image:
        pixels = rng.integers(0, 30, size=(size, size), dtype=np.uint8)
        band = slice(label * size // classes, (label + 1) * size // classes)
        pixels[:, band] = 80 + 170 * bias // max(1, classes - 1)
        picture = Image.fromarray(pixels, mode="L")
        return picture if mode == "L" else picture.convert(mode)

    def put(folder: Path, label: int, bias: int) -> None:
        nonlocal index
        folder.mkdir(parents=True, exist_ok=True)
        image(label, bias).save(folder / f"{index}_{label}_{bias}.png")
        index += 1

    dataset = root / name
    for label in range(classes):
        for k in range(aligned + conflicting):
            bias = label if k < aligned else (label + 1 + k % (classes - 1)) % classes
            put(dataset / pct / ("align" if bias == label else "conflict") / str(label), label, bias)
        for split, count in ((dataset / pct / "valid", 3), (dataset / "test", 6)):
            for k in range(count):
                put(split / str(label), label, (label + k) % classes)
    return dataset


def test_inspect_reads_classes_channels_size_and_counts(tmp_path: Path) -> None:
    write_tree(tmp_path)
    facts = inspect_folder(tmp_path, "bars", "5pct")
    assert (facts.num_classes, facts.num_bias_classes, facts.channels, facts.image_size) == (3, 3, 1, 16)
    assert (facts.train, facts.conflicting, facts.valid, facts.test) == (48, 6, 9, 18)
    assert "3 classes" in facts.summary() and json.loads(facts.to_json())["image_size"] == 16
    rgb = tmp_path / "rgb"
    write_tree(rgb, mode="RGB", size=40)
    facts = inspect_folder(rgb, "bars", "5pct", num_bias_classes=5)
    assert (facts.channels, facts.image_size, facts.num_bias_classes) == (3, 40, 5)


def test_inspect_names_the_path_and_the_rule(tmp_path: Path) -> None:
    dataset = write_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match="no '1pct' folder.*available: .'5pct'"):
        inspect_folder(tmp_path, "bars", "1pct")
    Image.new("L", (20, 16)).save(dataset / "test" / "0" / "999_0_0.png")
    with pytest.raises(ValueError, match=r"not all one square size \(16x16 ×75, 20x16 ×1\).*--image-size"):
        inspect_folder(tmp_path, "bars", "5pct")
    assert inspect_folder(tmp_path, "bars", "5pct", image_size=16).image_size == 16
    with pytest.raises(ValueError, match="num_bias_classes=2 but .* bias values up to 2"):
        inspect_folder(tmp_path, "bars", "5pct", image_size=16, num_bias_classes=2)
    for path in (dataset / "test" / "2").iterdir():
        path.unlink()
    with pytest.raises(ValueError, match=r"test.*class\(es\) \[2\] have no images"):
        inspect_folder(tmp_path, "bars", "5pct", image_size=16)


def test_geometry_and_template_set_follow_the_image_side() -> None:
    assert template_set(28) == "small" and template_set(33) == "large"
    assert diffusion_geometry(28) == diffusion_geometry(28).__class__("cmnist-small", 28, 28)
    assert (diffusion_geometry(30).model_size, diffusion_geometry(30).data_size) == (32, 30)
    assert diffusion_geometry(48).preset == "64" and diffusion_geometry(48).data_size == 48
    assert diffusion_geometry(100).data_size == 128  # not a multiple of 16: resized to the preset's side
    assert (diffusion_geometry(224).preset, diffusion_geometry(224).data_size) == ("256", 224)
    assert diffusion_geometry(512).data_size == 256


def test_fill_config_sets_only_keys_the_template_has(tmp_path: Path) -> None:
    write_tree(tmp_path)
    facts = inspect_folder(tmp_path, "bars", "5pct")
    config = {
        "model": {"class_path": "BiasClassifier", "init_args": {"num_classes": 10, "image_size": 28}},
        "data": {"class_path": "FolderDataModule", "init_args": {"name": "x", "channels": 3}},
    }
    fill_config(config, "bias", facts, "conflicting")
    assert config["model"]["init_args"] == {"num_classes": 3, "image_size": 16}
    assert config["data"]["init_args"] == {"name": "bars", "channels": 1}
    with pytest.raises(ValueError, match="headline='best'"):
        fill_config(config, "bias", facts, "best")  # type: ignore[arg-type]


def test_plan_derives_every_stage_from_the_tree(tmp_path: Path) -> None:
    write_tree(tmp_path / "data", size=40, mode="RGB")
    opts = Options(
        dataset="folder", name="bars", pct="5pct", seeds=[0], runs=str(tmp_path / "runs"),
        data_root=str(tmp_path / "data"), configs=str(REPO / "configs"), headline="conflicting",
    )  # fmt: skip
    assert opts.root == tmp_path / "runs" / "folder" / "bars" / "5pct"
    steps = {step.key: step for step in plan(opts)}
    bias = steps["seed0/bias"].config["fit"]
    assert bias["model"]["init_args"]["arch"] == "resnet18"  # > 32 px: the large template set
    assert bias["model"]["init_args"]["num_classes"] == 3 and bias["data"]["init_args"]["image_size"] == 40
    assert bias["data"]["init_args"]["unbiased_test_subset"] == "conflicting"
    assert bias["trainer"]["default_root_dir"] == str(opts.root / "seed0" / "bias")
    diffusion = steps["diffusion"].config
    assert diffusion["model"]["init_args"]["unet_preset"] == "64"
    assert diffusion["data"]["init_args"]["image_size"] == 40 and diffusion["trainer"]["max_steps"] == 30000
    inject = steps["seed0/inject"].config["data"]["init_args"]["data"]["init_args"]
    assert inject["image_size"] == 40 and inject["root"] == str(tmp_path / "data")
    for bad in ("../x", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="plain folder name"):
            plan(Options(dataset="folder", name="bars", pct=bad, data_root=str(tmp_path / "data")))
    with pytest.raises(ValueError, match="needs NAME"):
        plan(Options(dataset="folder", data_root=str(tmp_path / "data")))
    with pytest.raises(ValueError, match="each seed may appear once"):
        plan(Options(seeds=[0, 0], configs=str(REPO / "configs")))


def test_a_given_diffusion_export_replaces_the_diffusion_stage(tmp_path: Path) -> None:
    write_tree(tmp_path / "data")
    common = {"dataset": "folder", "name": "bars", "pct": "5pct", "seeds": [0], "runs": str(tmp_path / "r")}
    common |= {"data_root": str(tmp_path / "data"), "configs": str(REPO / "configs")}
    with pytest.raises(FileNotFoundError, match="not a diffusion export .*config.json, diffusion_info.json"):
        plan(Options(**common, diffusion=str(tmp_path)))
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    (export / "diffusion_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="diffusion_info.json is not valid JSON"):
        plan(Options(**common, diffusion=str(export)))
    (export / "diffusion_info.json").write_text('{"image_size": 24}')
    steps = {step.key: step for step in plan(Options(**common, diffusion=str(export)))}
    assert "diffusion" not in steps
    assert steps["seed0/inject"].upstream == ["seed0/bias", "seed0/vanilla"]  # no diffusion step; the premise
    inject = steps["seed0/inject"].config
    assert inject["model"]["init_args"]["unet"] == str(export.resolve())
    assert inject["data"]["init_args"]["data"]["init_args"]["image_size"] == 24  # the model's, not the data's


def test_folder_smoke_pipeline_end_to_end_then_with_its_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A generated grayscale tree through every stage and the report; then a second run that reuses the first
    run's diffusion export (DIFFUSION=<dir>) instead of training one."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_tree(tmp_path / "data", aligned=38, conflicting=4)  # ≥ 40 per class: K = 40
    argv = ["--dataset", "folder", "--name", "bars", "--pct", "5pct", "--data-root", str(tmp_path / "data")]
    argv += ["--profile", "smoke", "--seeds", "0", "--jobs", "2"]
    pipeline.main([*argv, "--runs", str(tmp_path / "runs")])
    root = tmp_path / "runs" / "folder" / "bars" / "5pct"
    for artifact in ("seed0/debias/metrics.json", "seed0/inject/manifest.csv", "report/results.md"):
        assert (root / artifact).is_file(), artifact
    assert json.loads((root / "dataset.json").read_text())["channels"] == 1
    assert "folder dataset" in capsys.readouterr().out
    unet = root / "diffusion" / "unet"
    assert json.loads((unet / "config.json").read_text())["in_channels"] == 1

    again = tmp_path / "again"
    stages = ["--stages", "bias", "vanilla", "inject"]  # inject's premise check reads the Vanilla model
    pipeline.main([*argv, "--runs", str(again), "--diffusion", str(unet), *stages])
    out = capsys.readouterr().out
    second = again / "folder" / "bars" / "5pct"
    assert (second / "seed0" / "inject" / "manifest.csv").is_file()
    assert (second / "diffusion" / "unet").resolve() == unet.resolve() and "(not trained)" in out
    assert not (second / "diffusion" / "checkpoints").exists()


def test_exported_cmnist_tree_is_served_exactly_as_cmnist(tmp_path: Path) -> None:
    """Same configs (but the data section) and the same tensors, batches and indices: the same numbers."""
    from diffinject.data import CMNISTDataModule
    from diffinject.data.export import export_datamodule
    from diffinject.report.synthetic import resolve_class

    cmnist = CMNISTDataModule(root=str(tmp_path / "none"), ratio=0.05, source="embedded", num_workers=0)
    export_datamodule(cmnist, tmp_path / "tree")
    runs = str(tmp_path / "runs")
    mine = Options(dataset="cmnist", pct="5pct", runs=runs, configs=str(REPO / "configs"))
    theirs = Options(dataset="folder", name="cmnist", pct="5pct", runs=runs, configs=str(REPO / "configs"))
    theirs.data_root = str(tmp_path / "tree")
    for stage in ("bias", "vanilla", "lff", "debias"):
        a, b = stage_config(mine, stage, 0), stage_config(theirs, stage, 0)
        b["model"]["init_args"].pop("num_bias_classes")  # equal to num_classes, CMNIST's default
        assert json.dumps(a["model"]).replace("/cmnist/", "/folder/cmnist/") == json.dumps(b["model"])
        assert a["trainer"]["max_epochs"] == b["trainer"]["max_epochs"]
        assert a["data"]["init_args"]["batch_size"] == b["data"]["init_args"]["batch_size"]
    section = stage_config(theirs, "bias", 0)["data"]
    folder = resolve_class(section["class_path"])(**section["init_args"])
    cmnist.setup("fit"), folder.setup("fit")
    for split in ("train_dataloader", "val_dataloader"):
        batches = []
        for module in (cmnist, folder):
            torch.manual_seed(0)  # the shuffle draws from the global generator, seeded by seed_everything
            batches.append(list(getattr(module, split)()))
        assert len(batches[0]) == len(batches[1]) > 0
        for x, y in zip(*batches, strict=True):
            for key in ("image", "label", "bias", "index"):
                assert torch.equal(x[key], y[key]), (split, key)
