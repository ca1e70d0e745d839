"""The study runner's pure parts: which stages a variant rebuilds, how overrides read, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffinject.report.inputs import knobs_of
from diffinject.workflow.configs import Options, load_yaml, stage_config
from diffinject.workflow.study import describe, link_shared, row_of, stages_to_run, table

REPO = Path(__file__).resolve().parents[1]


def test_stages_to_run_follows_downstream() -> None:
    assert stages_to_run({}) == []
    assert stages_to_run({"inject": {"model": {"init_args": {"gamma": 0.3}}}}) == ["inject", "debias"]
    assert stages_to_run({"debias": {"model": {}}}) == ["debias"]
    assert stages_to_run({"diffusion": {"trainer": {"max_steps": 1}}}) == ["diffusion", "inject", "debias"]
    with pytest.raises(ValueError, match="variant section 'report'"):
        stages_to_run({"report": {"x": 1}})


def test_describe_flattens_and_summarises_swapped_classes() -> None:
    variant = {
        "inject": {"model": {"init_args": {"gamma": 0.3}}},
        "debias": {"model": {"class_path": "LfFClassifier", "init_args": {"q": 0.7}}},
    }
    assert describe(variant) == ["inject.model.gamma=0.3", "debias.model=LfFClassifier(q=0.7)"]


def test_link_shared_links_only_what_the_variant_keeps(tmp_path: Path) -> None:
    base, root = tmp_path / "base", tmp_path / "variant"
    for folder in ("diffusion", "seed0/vanilla", "seed0/lff", "seed0/bias", "seed0/inject", "seed0/debias"):
        (base / folder).mkdir(parents=True)
    link_shared(base, root, [0], ["inject", "debias"])
    assert (root / "diffusion").is_symlink() and (root / "seed0" / "bias").is_symlink()
    assert not (root / "seed0" / "inject").exists() and not (root / "seed0" / "debias").exists()
    with pytest.raises(FileNotFoundError, match="make pipeline"):
        link_shared(tmp_path / "missing", tmp_path / "other", [0], ["debias"])

    # the variant file changed: it now overrides bias, and no longer inject
    (root / "seed0" / "inject").mkdir()
    (root / "seed0" / "inject" / "stale.png").write_text("from an earlier version of the variant")
    link_shared(base, root, [0], ["bias", "debias"])
    assert not (root / "seed0" / "bias").exists()  # the old link is gone: the stage gets its own folder
    assert (root / "seed0" / "inject").resolve() == (base / "seed0" / "inject").resolve()
    assert (base / "seed0" / "bias").is_dir()  # unlinking never touches the base run


def test_table_rows() -> None:
    stat = {"mean": 0.5, "std": 0.1}
    row = {
        "variant": "v",
        "overrides": ["inject.model.gamma=0.3"],
        "methods": {"debias": {"test/acc": stat, "test/acc_conflicting": stat}},
        "topk_precision": None,
        "synthetic_conflict_rate": stat,
        "synthetic_shape_is_label": None,
    }
    text = table([row])
    assert "| v | inject.model.gamma=0.3 | 50.0 ± 10.0 | 50.0 ± 10.0 | – | – | 50.0 ± 10.0 | – |" in text


@pytest.mark.parametrize(
    ("name", "control"), [("control_nodiffusion", "uniform_colour"), ("control_shuffled", "shuffle_labels")]
)
def test_control_variants_rerun_only_debias_and_the_table_says_so(
    tmp_path: Path, name: str, control: str
) -> None:
    file = REPO / "configs" / "cmnist" / "study" / f"{name}.yaml"
    variant = load_yaml(file)
    assert stages_to_run(variant) == ["debias"]
    assert describe(variant) == [f"debias.data.synthetic_control={control}"]
    opts = Options(runs=str(tmp_path), variants=[str(file)], configs=str(REPO / "configs"))
    config = stage_config(opts, "debias", seed=0)
    assert config["data"]["init_args"]["synthetic_control"] == control
    assert config["data"]["init_args"]["synthetic_manifest"].endswith("seed0/inject/manifest_accepted.csv")
    assert config["model"]["class_path"] == "LfFClassifier"  # the default debiasing, only the data differs
    knobs = knobs_of("debias", config)
    assert knobs["synthetic_control"] == control

    # The report measured the (linked) inject manifest, not what this row trained on: shown as n/a.
    stat = {"mean": 0.5, "std": 0.1}
    results = {
        "methods": {"debias": {"test/acc": stat}},
        "synthetic": {"summary": {"colour.conflict_rate": stat, "shape.shape_is_label": stat}},
        "configs": {"knobs": {"debias": knobs}},
    }
    row = row_of(name, variant, results)
    assert row["synthetic_control"] == control and row["synthetic_conflict_rate"] is None
    text = table([row])
    assert f"| debias.data.synthetic_control={control} | 50.0 ± 10.0 |" in text
    assert text.rstrip().endswith(f"| n/a (control: {control}) | n/a (control: {control}) |")
    plain = row_of("default", {}, {**results, "configs": {"knobs": {"debias": {"class": "LfFClassifier"}}}})
    assert plain["synthetic_control"] is None and plain["synthetic_conflict_rate"] == stat


def test_a_folder_study_runs_under_the_trees_name_and_passes_its_data_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`make study DATASET=folder NAME=… DATA_ROOT=…`: base, variant root and table follow the tree's name."""
    from diffinject.workflow import study

    runs = tmp_path / "runs"
    base = runs / "folder" / "trees" / "1pct"
    for stage in ("diffusion", "seed0/vanilla", "seed0/lff", "seed0/bias", "seed0/inject"):
        (base / stage).mkdir(parents=True)
    calls: list[list[str]] = []

    def fake_pipeline(argv: list[str]) -> None:  # what the study hands the pipeline; a report to read back
        calls.append(argv)
        report = runs / "study" / "control_oversample" / "folder" / "trees" / "1pct" / "report"
        report.mkdir(parents=True)
        (report / "results.json").write_text('{"methods": {}, "configs": {"knobs": {}}}')

    monkeypatch.setattr(study.pipeline, "main", fake_pipeline)
    variant = str(REPO / "configs" / "cmnist" / "study" / "control_oversample.yaml")
    common = ["--dataset", "folder", "--pct", "1pct", "--seeds", "0", "--runs", str(runs)]
    study.main([*common, "--name", "trees", "--data-root", str(tmp_path / "data"), variant])

    (argv,) = calls
    assert argv[argv.index("--name") + 1] == "trees"
    assert argv[argv.index("--data-root") + 1] == str(tmp_path / "data")
    root = runs / "study" / "control_oversample" / "folder" / "trees" / "1pct"
    assert (root / "seed0" / "inject").resolve() == (base / "seed0" / "inject").resolve()
    assert (runs / "study" / "folder-trees-1pct.md").is_file()

    with pytest.raises(SystemExit) as error:  # no NAME: refused before anything runs
        study.main([*common, variant])
    assert error.value.code == 2


def test_a_variant_of_other_rows_gets_a_line_per_row_and_does_not_claim_the_base_diffinject() -> None:
    stat, other = {"mean": 0.5, "std": 0.1}, {"mean": 0.25, "std": 0.05}
    variant = {"a2": {"model": {"class_path": "LfFClassifier"}}}
    methods = {"debias": {"test/acc": stat}, "a2": {"test/acc": other}, "lff": {"test/acc": stat}}
    results = {"methods": methods}
    row = row_of("gan_rows_lff", variant, results)
    assert row["reran"] == ["a2"]
    lines = table([row]).splitlines()
    assert lines[2].split(" | ")[2:5] == ["(base run)"] * 3  # the linked DiffInject is not this variant's
    assert lines[3].startswith("| gan_rows_lff: a2 | (row) | 25.0 ± 5.0 |")
    assert len(lines) == 4  # no line for lff, which the variant did not rerun
