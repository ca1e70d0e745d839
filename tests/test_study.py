"""The study runner's pure parts: which stages a variant rebuilds, how overrides read, the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffinject.study import describe, link_shared, stages_to_run, table


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
