"""`--variant` files are checked before any stage starts: a misspelt stage, a section that is not a mapping,
a YAML syntax error or a non-UTF-8 file is one message naming the file, the line and the rule (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffinject.workflow import pipeline, study

REPO = Path(__file__).resolve().parents[1]


def run_with_variant(tmp_path: Path, content: bytes, capsys) -> str:
    """`pipeline.main --dry-run` with one variant file; returns stderr after asserting exit code 2."""
    variant = tmp_path / "variant.yaml"
    variant.write_bytes(content)
    argv = ["--runs", str(tmp_path / "runs"), "--seeds", "0", "--stages", "bias", "--dry-run"]
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([*argv, "--variant", str(variant)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("[pipeline] cannot start: ") and "Traceback" not in err
    return err.replace(str(variant), "FILE")


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch) -> None:
    monkeypatch.chdir(REPO)


def test_a_misspelt_stage_is_refused_with_the_nearest_name(tmp_path: Path, capsys) -> None:
    err = run_with_variant(tmp_path, b"# lower lr\nbiass:\n  model:\n    init_args: {lr: 0.1}\n", capsys)
    assert "variant file FILE, line 2: unknown stage 'biass' (did you mean 'bias'?)" in err
    listed = err.split("the top-level keys of a variant are stages: ")[1].strip().split(", ")
    first = ["vanilla", "lff", "disent", "lff_be", "disent_be", "bias", "diffusion", "inject", "debias"]
    assert listed[:9] == first
    assert {"topk", "a2", "a2_source", "a2_adapt", "amplibias_gan", "amplibias_generate"} <= set(listed)


def test_a_section_that_is_a_list_is_refused(tmp_path: Path, capsys) -> None:
    err = run_with_variant(tmp_path, b"bias:\n  - model: {}\n", capsys)
    assert "variant file FILE, line 1: the 'bias' section must be a mapping of overrides" in err
    assert "got a list" in err and "AttributeError" not in err


def test_a_top_level_that_is_not_a_mapping_is_refused(tmp_path: Path, capsys) -> None:
    err = run_with_variant(tmp_path, b"- bias\n", capsys)
    assert "variant file FILE: expected a mapping of stage → overrides at the top level" in err


def test_a_yaml_syntax_error_names_file_and_line(tmp_path: Path, capsys) -> None:
    err = run_with_variant(tmp_path, b"bias:\n  model: [1, 2\ninject: {}\n", capsys)
    assert (
        "variant file FILE, line 3, column 7: not valid YAML (while parsing a flow sequence begun at line 2"
        in err
    )


def test_a_non_utf8_file_names_file_and_line(tmp_path: Path, capsys) -> None:
    err = run_with_variant(tmp_path, b"bias:\n  model: caf\xe9\n", capsys)
    assert "variant file FILE, line 2: not UTF-8 text (byte 0xe9); save it as UTF-8" in err


def test_study_checks_every_variant_before_running_one(tmp_path: Path, capsys) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("debias:\n  model: {init_args: {lr: 0.01}}\n")
    bad.write_text("injekt:\n  model: {}\n")
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--runs", str(tmp_path / "runs"), "--", str(good), str(bad)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"[study] cannot start: variant file {bad}, line 1: unknown stage 'injekt'" in err
    assert "(did you mean 'inject'?)" in err and not (tmp_path / "runs").exists()
