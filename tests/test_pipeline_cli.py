"""The pipeline's command line as a user meets it: a missing dataset is one message and exit code 2 before any
stage starts; a failing stage ends in a one-screen summary (exit 1); profile and `--variant` sections merge
into the stage configs in order; `study.main` links, merges rows and writes the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffinject.workflow import pipeline, study
from diffinject.workflow.configs import Options, stage_config

REPO = Path(__file__).resolve().parents[1]


def test_missing_bffhq_is_one_message_before_any_stage(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    argv = ["--dataset", "bffhq", "--pct", "0.5pct", "--data-root", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([*argv, "--runs", str(tmp_path / "runs"), "--seeds", "0"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("cannot start") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'data' / 'bffhq'} not found" in err and "{idx}_{label}_{bias}.png" in err
    assert "DisEnt / BiasEnsemble" in err and "DATA_ROOT=/path/to/data" in err
    assert "running" not in captured.out and not (tmp_path / "runs").exists()


def test_a_stage_needing_an_output_that_is_not_there_stops_before_starting(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--runs", str(tmp_path), "--seeds", "0", "--stages", "debias"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed0/debias reads manifest.csv, manifest_accepted.csv from" in err
    assert "seed0/debias reads checkpoints/best.ckpt" in err


def test_a_failing_stage_ends_in_a_summary(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    variant = tmp_path / "broken.yaml"
    variant.write_text(yaml.safe_dump({"bias": {"model": {"init_args": {"arch": "no-such-net"}}}}))
    argv = ["--runs", str(tmp_path / "runs"), "--seeds", "0", "--stages", "bias", "lff", "--profile", "smoke"]
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([*argv, "--variant", str(variant), "--no-report"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    summary = err[err.index("step(s) did not finish") :]
    assert (
        "seed0/bias: `diffinject fit" in summary
        and "seed0/lff: not run: upstream seed0/bias failed" in summary
    )
    assert "log: " in summary and "no-such-net" in summary.split("last error:")[1].splitlines()[0]
    assert "Traceback" not in summary


def test_profile_then_variants_merge_in_order(tmp_path: Path) -> None:
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({"inject": {"model": {"init_args": {"gamma": 0.3, "steps": 7}}}}))
    second.write_text(yaml.safe_dump({"inject": {"model": {"init_args": {"gamma": 0.5}}}}))
    opts = Options(profile="smoke", configs=str(REPO / "configs"), runs=str(tmp_path))
    base = stage_config(opts, "inject", 0)["model"]["init_args"]
    assert base["steps"] == 10 and base["t_edit"] == 400  # the smoke profile over the template
    opts.variants = [str(first), str(second)]
    merged = stage_config(opts, "inject", 0)["model"]["init_args"]
    assert (merged["gamma"], merged["steps"], merged["t_edit"]) == (0.5, 7, 400)  # later files win, keys kept


def fake_pipeline_main(argv: list[str]) -> None:
    """Stands in for a pipeline run: writes the variant's debias metrics and its report, like the real one."""
    runs, seeds = (
        Path(argv[argv.index("--runs") + 1]),
        argv[argv.index("--seeds") + 1 : argv.index("--stages")],
    )
    root = runs / "cmnist" / "1pct"
    gamma = yaml.safe_load(Path(argv[argv.index("--variant") + 1]).read_text())["inject"]["gamma"]
    for seed in seeds:
        write_metrics(root / f"seed{seed}" / "debias", 0.5 + gamma + int(seed) / 100)
    from diffinject.report import write_report

    write_report(root, seeds=[int(s) for s in seeds])


def write_metrics(folder: Path, acc: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    test = {
        "test/acc": acc,
        "test/acc_aligned": acc,
        "test/acc_conflicting": acc,
        "test/acc_worst_group": acc,
    }
    (folder / "metrics.json").write_text(json.dumps({"test": test, "checkpoint_epoch": 1}))


def test_study_main_links_merges_rows_and_writes_the_table(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "cmnist" / "1pct"
    for folder in ("diffusion", "seed0/vanilla", "seed0/lff", "seed0/bias", "seed0/inject", "seed0/debias"):
        (base / folder).mkdir(parents=True)
    write_metrics(base / "seed0" / "vanilla", 0.4)
    monkeypatch.setattr(pipeline, "main", fake_pipeline_main)
    variants = []
    for name, gamma in (("low", 0.1), ("high", 0.3)):
        variants.append(tmp_path / f"{name}.yaml")
        variants[-1].write_text(yaml.safe_dump({"inject": {"gamma": gamma}}))
    argv = ["--runs", str(tmp_path), "--seeds", "0", "--"]
    study.main([*argv, *map(str, variants)])
    linked = tmp_path / "study" / "low" / "cmnist" / "1pct"
    assert (linked / "seed0" / "bias").is_symlink() and (linked / "seed0" / "vanilla").is_symlink()
    assert not (linked / "seed0" / "debias").is_symlink()  # rebuilt by the variant
    rows = json.loads((tmp_path / "study" / "cmnist-1pct.json").read_text())
    assert [row["variant"] for row in rows] == ["low", "high"]
    assert rows[0]["methods"]["debias"]["test/acc"]["mean"] == pytest.approx(0.6)
    assert rows[0]["methods"]["vanilla"]["test/acc"]["mean"] == pytest.approx(0.4)  # read through the link

    variants[0].write_text(yaml.safe_dump({"inject": {"gamma": 0.2}}))  # rerun one variant: its row replaced
    study.main([*argv, str(variants[0])])
    rows = json.loads((tmp_path / "study" / "cmnist-1pct.json").read_text())
    assert [row["variant"] for row in rows] == ["high", "low"]
    assert rows[1]["methods"]["debias"]["test/acc"]["mean"] == pytest.approx(0.7)
    table = (tmp_path / "study" / "cmnist-1pct.md").read_text()
    assert "| low | inject.gamma=0.2 | 70.0 ± 0.0 |" in table and "| high | inject.gamma=0.3 | 80.0" in table


def test_inject_without_its_vanilla_model_stops_before_starting(tmp_path: Path, monkeypatch, capsys) -> None:
    """The gate's premise check reads the seed's Vanilla checkpoint: a plan without it is refused up front."""
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--runs", str(tmp_path), "--seeds", "0", "--stages", "inject"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "seed0/inject reads checkpoints/best.ckpt, metrics.json from" in err and "seed0/vanilla" in err
