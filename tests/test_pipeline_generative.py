"""The generative baselines in the pipeline (issue 22): planning, resolved configs, and a smoke run of every
stage end to end (tiny GANs, embedded digits) with the report's rows and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diffinject.workflow import pipeline
from diffinject.workflow.configs import Options
from diffinject.workflow.generative import classifier_config, generator_config
from diffinject.workflow.pipeline import plan

REPO = Path(__file__).resolve().parents[1]
ROWS = ["a2", "a2_nocdc", "amplibias", "topk_oversample"]


def _opts(tmp_path: Path, **kwargs) -> Options:
    return Options(runs=str(tmp_path), configs=str(REPO / "configs"), **kwargs)


def test_plan_shares_the_source_gan_and_orders_each_chain(tmp_path: Path) -> None:
    steps = plan(_opts(tmp_path, seeds=[0, 1], stages=["bias", *ROWS]))
    keys = [s.key for s in steps]
    assert keys.count("a2_source") == 1 and "seed0/a2_source" not in keys
    for seed in (0, 1):
        order = [keys.index(f"seed{seed}/{s}") for s in ("bias", "a2_adapt", "a2_translate", "a2")]
        assert order == sorted(order)
        assert keys.index(f"seed{seed}/amplibias_gan") < keys.index(f"seed{seed}/amplibias_generate")
    by_key = {s.key: s for s in steps}
    assert by_key["seed1/a2_adapt"].upstream == ["a2_source", "seed1/bias"]
    assert by_key["seed1/a2_nocdc_translate"].upstream == ["a2_source", "seed1/a2_nocdc_adapt", "seed1/bias"]
    assert by_key["seed1/topk_oversample"].upstream == ["seed1/amplibias_generate", "seed1/bias"]
    assert by_key["a2_source"].artifact == tmp_path / "cmnist/1pct/a2_source/generator/gan_info.json"
    # only what the selected rows need
    only = [s.key for s in plan(_opts(tmp_path, seeds=[0], stages=["amplibias"]))]
    assert only == ["seed0/amplibias_gan", "seed0/amplibias_generate", "seed0/amplibias"]


def test_control_configs_differ_from_the_method_only_where_they_should(tmp_path: Path) -> None:
    opts = _opts(tmp_path, seeds=[2])
    root = tmp_path / "cmnist" / "1pct"
    adapt, control = generator_config(opts, "a2_adapt", 2), generator_config(opts, "a2_nocdc_adapt", 2)
    assert adapt["model"]["init_args"]["consistency_weight"] > 0
    assert control["model"]["init_args"]["consistency_weight"] == 0
    assert control["model"]["init_args"]["export_dir"] == f"{root}/seed2/a2_nocdc_adapt/generator"
    assert control["trainer"]["logger"]["init_args"]["name"] == "a2_nocdc_adapt"
    translate = generator_config(opts, "a2_nocdc_translate", 2)
    assert translate["model"]["init_args"]["adapted"] == f"{root}/seed2/a2_nocdc_adapt/generator"
    assert translate["model"]["init_args"]["source"] == f"{root}/a2_source/generator"
    assert translate["data"]["init_args"]["seed"] == 2  # which images are translated follows the seed
    a2, oversample = classifier_config(opts, "a2", 2), classifier_config(opts, "topk_oversample", 2)
    assert a2["model"]["class_path"] == "DebiasClassifier" and a2["model"]["init_args"]["loss"] == "gce"
    # the same label-free selection rule as the DiffInject row
    debias = pipeline.stage_config(opts, "debias", 2)
    assert a2["model"]["init_args"]["selection_bias"] == debias["model"]["init_args"]["selection_bias"]
    assert a2["data"]["init_args"]["synthetic_manifest"] == f"{root}/seed2/a2_translate/manifest.csv"
    assert "synthetic_control" not in a2["data"]["init_args"]
    assert oversample["data"]["init_args"]["synthetic_control"] == "content_copy"
    assert oversample["data"]["init_args"]["synthetic_manifest"].endswith(
        "seed2/amplibias_generate/manifest.csv"
    )


def test_variants_reach_their_own_row_only(tmp_path: Path) -> None:
    variant = tmp_path / "v.yaml"
    variant.write_text(
        "debias:\n  data: {init_args: {synthetic_control: shuffle_labels}}\n"
        "a2:\n  model: {init_args: {loss: ce}}\n"
        "a2_nocdc_adapt:\n  trainer: {max_steps: 7}\n"
    )
    opts = _opts(tmp_path, seeds=[0], variants=[str(variant)])
    assert classifier_config(opts, "a2", 0)["model"]["init_args"]["loss"] == "ce"
    assert "synthetic_control" not in classifier_config(opts, "a2", 0)["data"]["init_args"]
    assert generator_config(opts, "a2_nocdc_adapt", 0)["trainer"]["max_steps"] == 7
    assert generator_config(opts, "a2_adapt", 0)["trainer"]["max_steps"] != 7


def test_a_variant_may_swap_the_retraining_class_and_keeps_the_seed_paths(tmp_path: Path) -> None:
    """configs/cmnist/study/gan_rows_lff.yaml: the generators compared under DiffInject's own retraining."""
    opts = _opts(tmp_path, seeds=[1], variants=[str(REPO / "configs/cmnist/study/gan_rows_lff.yaml")])
    plain = classifier_config(_opts(tmp_path, seeds=[1]), "amplibias", 1)["model"]["init_args"]
    model = classifier_config(opts, "amplibias", 1)["model"]
    assert model["class_path"] == "LfFClassifier" and "loss" not in model["init_args"]
    assert model["init_args"]["alpha"] == 0.7 and model["init_args"]["if_no_synthetic"] == "erm"
    shared = {k: v for k, v in plain.items() if k != "loss"}
    assert {k: model["init_args"][k] for k in shared} == shared  # sizes, lr, seed 1's selection model
    assert shared["selection_bias"].endswith("seed1/bias/checkpoints/best.ckpt")


def test_generator_folders_linked_by_a_study_are_used_not_planned(tmp_path: Path) -> None:
    """A study variant that retrains a row links the base run's generators; rebuilding them would clear a
    symlink (or, worse, the base run's folder)."""
    base = tmp_path / "base"
    root = tmp_path / "cmnist" / "1pct"
    for stage in ("a2_source", "seed0/a2_adapt", "seed0/a2_translate"):
        (base / stage).mkdir(parents=True)
        (root / stage).parent.mkdir(parents=True, exist_ok=True)
        (root / stage).symlink_to(base / stage, target_is_directory=True)
    keys = [s.key for s in plan(_opts(tmp_path, seeds=[0], stages=["a2"]))]
    assert keys == ["seed0/a2"]
    keys = [s.key for s in plan(_opts(tmp_path, seeds=[0, 1], stages=["a2"]))]
    assert keys == ["seed1/a2_adapt", "seed1/a2_translate", "seed0/a2", "seed1/a2"]


def test_datasets_without_gan_configs_borrow_the_recipe_with_their_data(tmp_path: Path) -> None:
    opts = _opts(tmp_path, dataset="bffhq", pct="0.5pct", seeds=[0])
    source = generator_config(opts, "a2_source", None)
    assert source["data"]["class_path"] == "BFFHQDataModule"
    assert source["data"]["init_args"]["pct"] == "0.5pct"
    assert (
        source["model"]["init_args"]["image_size"] == 224 and source["model"]["init_args"]["model_size"] == 64
    )
    assert source["model"]["init_args"]["export_dir"] == f"{tmp_path}/bffhq/0.5pct/a2_source/generator"
    generate = generator_config(opts, "amplibias_generate", 0)
    assert generate["data"]["init_args"]["data"]["class_path"] == "BFFHQDataModule"
    assert generate["data"]["init_args"]["topk"] == f"{tmp_path}/bffhq/0.5pct/seed0/bias/topk.csv"


def test_own_folder_data_gets_the_recipe_with_the_tree_facts(tmp_path: Path) -> None:
    from test_pipeline_folder import write_tree

    write_tree(tmp_path / "data", size=16, mode="L")
    opts = Options(
        dataset="folder", name="bars", pct="5pct", seeds=[0], runs=str(tmp_path / "runs"),
        data_root=str(tmp_path / "data"), configs=str(REPO / "configs"), stages=["bias", *ROWS],
    )  # fmt: skip
    steps = {step.key: step for step in plan(opts)}
    source = steps["a2_source"].config
    assert source["data"]["class_path"].endswith("FolderDataModule")
    assert source["data"]["init_args"]["name"] == "bars" and source["data"]["init_args"]["pct"] == "5pct"
    assert source["data"]["init_args"]["root"] == str(tmp_path / "data")
    model = source["model"]["init_args"]
    assert (model["image_size"], model["channels"], model["model_size"]) == (16, 1, 32)
    gan = steps["seed0/amplibias_gan"].config
    assert gan["model"]["init_args"]["channels"] == 1
    assert gan["data"]["init_args"]["data"]["init_args"]["num_classes"] == 3
    row = steps["seed0/a2"].config
    assert row["model"]["init_args"]["num_classes"] == 3 and row["model"]["init_args"]["in_channels"] == 1


def test_missing_bias_stage_stops_before_any_generator_runs(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        pipeline.main(["--runs", str(tmp_path), "--seeds", "0", "--stages", "amplibias", "--no-report"])
    assert stopped.value.code == 2
    assert "seed0/amplibias_gan reads" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_generative_rows_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["--profile", "smoke", "--seeds", "0", "--runs", str(tmp_path), "--stages", "bias", *ROWS]
    pipeline.main([*argv, "--jobs", "2"])
    root = tmp_path / "cmnist" / "1pct"
    for artifact in (
        "a2_source/generator/gan_info.json",
        "seed0/a2_translate/manifest.csv",
        "seed0/a2_nocdc_translate/manifest.csv",
        "seed0/amplibias_generate/manifest.csv",
        *(f"seed0/{row}/metrics.json" for row in ROWS),
    ):
        assert (root / artifact).is_file(), artifact
    results = json.loads((root / "report" / "results.json").read_text())
    for row in ROWS:
        assert results["methods"][row]["n"] == 1
    assert set(results["generated"]) == {"a2_translate", "a2_nocdc_translate", "amplibias_generate"}
    assert results["generated"]["amplibias_generate"]["per_seed"]["0"]["size"] == 18  # 0.5 % of 3,600
    table = capsys.readouterr().out
    assert "| A² |" in table and "| AmpliBias |" in table and "top-K oversampling (control)" in table
    assert "Generated sets" in (root / "report" / "results.md").read_text()

    pipeline.main([*argv, "--jobs", "1", "--no-report"])
    out = capsys.readouterr().out
    for key in ("a2_source", "seed0/a2_adapt", "seed0/amplibias_generate", "seed0/a2"):
        assert f"{key}: done, skipped" in out
