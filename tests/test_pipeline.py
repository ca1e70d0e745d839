"""The pipeline: config resolution as pure functions, and the whole smoke profile end to end with resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from diffinject.workflow import pipeline
from diffinject.workflow.configs import Options, deep_merge, path_mover, pct_to_ratio, stage_config
from diffinject.workflow.pipeline import plan

REPO = Path(__file__).resolve().parents[1]


def test_pct_to_ratio() -> None:
    assert pct_to_ratio("1pct") == 0.01 and pct_to_ratio("0.5pct") == 0.005
    for bad in ("1", "xpct", "100pct"):
        with pytest.raises(ValueError, match="PCT="):
            pct_to_ratio(bad)


def test_deep_merge_merges_dicts_replaces_lists_and_other_classes() -> None:
    base = {"model": {"class_path": "A", "init_args": {"lr": 1, "q": 2}}, "cb": [1, 2]}
    merged = deep_merge(base, {"model": {"init_args": {"lr": 3}}, "cb": [3]})
    assert merged == {"model": {"class_path": "A", "init_args": {"lr": 3, "q": 2}}, "cb": [3]}
    swapped = deep_merge(base, {"model": {"class_path": "B", "init_args": {"alpha": 1}}})
    assert swapped["model"] == {"class_path": "B", "init_args": {"alpha": 1}}
    assert base["model"]["init_args"]["lr"] == 1  # inputs untouched


def test_path_mover_places_seeded_and_shared_folders(tmp_path: Path) -> None:
    move = path_mover("cmnist", tmp_path, seed=2)
    assert move("runs/cmnist/1pct/bias/topk.csv") == f"{tmp_path}/seed2/bias/topk.csv"
    assert move("runs/cmnist/1pct/diffusion/unet") == f"{tmp_path}/diffusion/unet"
    assert move("runs/cmnist/1pct") == f"{tmp_path}/seed2"
    assert move("data") == "data" and move("runs/other/1pct/x") == "runs/other/1pct/x"


def test_stage_config_resolves_profile_paths_and_split(tmp_path: Path) -> None:
    opts = Options(pct="5pct", runs=str(tmp_path), profile="smoke", configs=str(REPO / "configs"))
    inject = stage_config(opts, "inject", seed=1)
    source = inject["data"]["init_args"]["data"]["init_args"]
    assert source["ratio"] == 0.05
    assert inject["model"]["init_args"]["unet"] == f"{tmp_path}/cmnist/5pct/diffusion/unet"
    assert inject["model"]["init_args"]["steps"] == 10  # from configs/profiles/smoke.yaml
    with pytest.raises(FileNotFoundError, match="profile 'nope'"):
        stage_config(Options(profile="nope", configs=str(REPO / "configs")), "vanilla", 0)


def test_plan_orders_stages_and_links_upstream(tmp_path: Path) -> None:
    steps = plan(Options(seeds=[0, 1], runs=str(tmp_path), configs=str(REPO / "configs")))
    keys = [s.key for s in steps]
    assert keys.index("seed0/bias") < keys.index("diffusion") < keys.index("seed0/inject")
    assert keys.index("seed1/inject") < keys.index("seed1/debias")
    inject = steps[keys.index("seed1/inject")]
    # the gate's premise check reads the seed's Vanilla model
    assert inject.upstream == ["seed1/bias", "diffusion", "seed1/vanilla"]
    assert inject.config["data"]["init_args"]["seed"] == 1
    with pytest.raises(ValueError, match="DATASET='mnist'"):
        plan(Options(dataset="mnist"))


def test_smoke_pipeline_end_to_end_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Every stage on the embedded digits, the report with all three methods; then resume after a deletion."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = tmp_path / "runs"
    argv = ["--profile", "smoke", "--seeds", "0", "--runs", str(runs), "--jobs", "2"]
    pipeline.main(argv)
    root = runs / "cmnist" / "1pct"
    for artifact in (
        "seed0/vanilla/metrics.json",
        "seed0/lff/metrics.json",
        "seed0/bias/topk.csv",
        "diffusion/unet/config.json",
        "seed0/inject/manifest.csv",
        "seed0/debias/metrics.json",
        "report/results.md",
        "report/accuracy.png",
        "report/samples.png",
    ):
        assert (root / artifact).is_file(), artifact
    results = json.loads((root / "report" / "results.json").read_text())
    for stage in ("vanilla", "lff", "debias"):
        assert results["methods"][stage]["n"] == 1
    table = capsys.readouterr().out
    # "| DiffInject (plain ERM on 1 of 1 seeds: …)" when the smoke models fail the gate's premise check
    assert "| Vanilla |" in table and "| LfF |" in table and "| DiffInject" in table

    before = {p: p.stat().st_mtime for p in root.glob("seed0/*/metrics.json")}
    unet_time = (root / "diffusion/unet/config.json").stat().st_mtime
    shutil.rmtree(root / "seed0" / "inject")
    pipeline.main(argv)
    out = capsys.readouterr().out
    for kept in ("seed0/vanilla", "seed0/lff", "seed0/bias", "diffusion"):
        assert f"{kept}: done, skipped" in out
    # the inject stage is rebuilt bit for bit (same config, seeds, upstream): what read it stays valid
    assert "seed0/inject: running" in out and "seed0/debias: done, skipped" in out
    assert (root / "diffusion/unet/config.json").stat().st_mtime == unet_time
    assert (root / "seed0/inject/manifest.csv").is_file()

    # a changed injection setting (a later call, another config) rebuilds inject and what read it
    variant = tmp_path / "fewer_steps.yaml"
    variant.write_text("inject:\n  model: {init_args: {steps: 8}}\n")
    pipeline.main([*argv, "--variant", str(variant)])
    out = capsys.readouterr().out
    assert "seed0/inject: its config changed" in out and "seed0/debias: upstream seed0/inject rebuilt" in out
    after = {p: p.stat().st_mtime for p in root.glob("seed0/*/metrics.json")}
    assert after[root / "seed0/vanilla/metrics.json"] == before[root / "seed0/vanilla/metrics.json"]
    assert after[root / "seed0/debias/metrics.json"] > before[root / "seed0/debias/metrics.json"]


def test_selection_with_the_bias_model_waits_for_the_bias_stage(tmp_path: Path) -> None:
    steps = plan(Options(seeds=[0], runs=str(tmp_path), configs=str(REPO / "configs")))
    by_key = {s.key: s for s in steps}
    bias_ckpt = str(tmp_path / "cmnist" / "1pct" / "seed0" / "bias" / "checkpoints" / "best.ckpt")
    for stage in ("vanilla", "lff", "debias"):
        step = by_key[f"seed0/{stage}"]
        assert step.config["model"]["init_args"]["selection_bias"] == bias_ckpt
        assert "seed0/bias" in step.upstream
    keys = list(by_key)
    assert keys.index("seed0/bias") < keys.index("seed0/vanilla")
    without_bias = plan(Options(seeds=[0], runs=str(tmp_path), configs=str(REPO / "configs"), stages=["lff"]))
    assert [s.upstream for s in without_bias] == [["seed0/bias"]]  # read, not built: preflight checks it
