"""The results table (issue 20 §1): a row means a result, a column tells methods apart, every number says how
many seeds it is over, and an unreadable metrics.json drops that seed only, with a warning naming it."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from diffinject.measures.metrics import GroupedAccuracy, to_floats
from diffinject.report import write_report
from diffinject.report.groups import MIN_GROUP_IMAGES


def staged_metrics(correct: list[list[int]], total: list[list[int]], val: float = 0.9) -> dict[str, Any]:
    """metrics.json as the test stage writes it, from per-(label, bias) correct counts: predictions are
    built to match the counts and go through the real metric, so the scalars and the matrix agree."""
    classes, biases = len(total), len(total[0])
    metric = GroupedAccuracy(classes, biases)
    for label in range(classes):
        for bias in range(biases):
            n, right = total[label][bias], correct[label][bias]
            preds = torch.tensor([label] * right + [(label + 1) % classes] * (n - right), dtype=torch.long)
            metric.update(preds, torch.full((n,), label), torch.full((n,), bias))
    groups = metric.group_counts()
    return {
        "stage": "VanillaClassifier",
        "test": to_floats(metric.compute(), "test/"),
        "test_groups": groups,
        "val": {"val/acc": val},
        "checkpoint_epoch": 9,
        "hparams": {},
    }


def write(root: Path, seed: int, stage: str, payload: dict[str, Any] | bytes) -> Path:
    path = root / f"seed{seed}" / stage / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        path.write_text(json.dumps(payload))
    return path


def table_lines(root: Path) -> tuple[list[str], list[str]]:
    """(the compact table's lines, the lines under it) of results.md."""
    blocks = (root / "report" / "results.md").read_text().split("\n\n")
    return blocks[1].splitlines(), blocks[2].splitlines()


def cells(lines: list[str]) -> dict[str, dict[str, str]]:
    """method name → {column header: cell}."""
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        values = [c.strip() for c in line.strip("|").split("|")]
        rows[values[0]] = dict(zip(header, values, strict=True))
    return rows


def small_groups(conflicting_right: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Colored MNIST at 1 %: 10 × 10 groups of 10 test images; aligned groups all right, class c's nine
    conflicting groups together get conflicting_right[c] of 90 right, one group of class 0 at 0 %."""
    total = [[10] * 10 for _ in range(10)]
    correct = [[10 if b == c else 0 for b in range(10)] for c in range(10)]
    for c, right in enumerate(conflicting_right):
        others = [b for b in range(10) if b != c and not (c == 0 and b == 1)]  # (0, 1) stays at 0 %
        for i, b in enumerate(others):
            correct[c][b] = min(10, max(0, right - 10 * i))
    return correct, total


def test_worst_class_on_conflicting_images_hand_count() -> None:
    # label 0: conflicting (0,1) 2 of 4 right; label 1: conflicting (1,0) 3 of 3; label 2: none conflicting
    correct, total = [[5, 2, 0], [3, 1, 0], [0, 0, 2]], [[5, 4, 0], [3, 1, 0], [0, 0, 2]]
    out = staged_metrics(correct, total)
    assert out["test"]["test/acc_conflicting_worst_class"] == pytest.approx(0.5)
    assert out["test"]["test/acc_conflicting"] == pytest.approx(5 / 7)
    assert out["test_groups"] == {"correct": correct, "total": total}


def test_methods_not_run_have_no_row_and_one_line_says_what_adds_them(tmp_path: Path) -> None:
    """What a plain `make pipeline` leaves: no DisEnt, LfF+BE, DisEnt+BE."""
    root = tmp_path / "cmnist" / "1pct"
    correct, total = small_groups([60] * 10)
    for stage in ("vanilla", "lff", "debias", "bias"):
        write(root, 0, stage, staged_metrics(correct, total))
    result = write_report(root, seeds=[0])
    table, notes = table_lines(root)
    assert list(cells(table)) == ["Vanilla", "LfF", "DiffInject", "GCE bias (reference)"]
    line = "Not run, so not in the table: DisEnt, LfF+BE, DisEnt+BE, A², A² without the consistency term "
    line += "(control), AmpliBias, top-K oversampling (control) (`make baselines` adds them)."
    assert line in notes
    assert result["methods"]["disent"]["n"] == 0  # still in results.json, for scripts


def test_worst_class_tells_methods_apart_where_worst_group_is_zero(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    weak = small_groups([30, 40, 50, 60, 60, 60, 60, 60, 60, 60])  # class 0: 30 of 90 conflicting right
    strong = small_groups([70, 75, 80, 80, 80, 80, 80, 80, 80, 80])  # class 0: 70 of 90
    for seed in (0, 1):
        write(root, seed, "vanilla", staged_metrics(*weak))
        write(root, seed, "debias", staged_metrics(*strong))
    result = write_report(root)
    vanilla, debias = result["methods"]["vanilla"], result["methods"]["debias"]
    assert vanilla["test/acc_worst_group"]["mean"] == debias["test/acc_worst_group"]["mean"] == 0.0
    rows = cells(table_lines(root)[0])
    column = "worst class (conflicting)"
    assert rows["Vanilla"][column] == f"{100 * 30 / 90:.2f} ± 0.00"
    assert rows["DiffInject"][column] == f"{100 * 70 / 90:.2f} ± 0.00"
    assert "worst-group" not in rows["Vanilla"]  # 10 images per group: the minimum is noise
    notes = table_lines(root)[1]
    assert any("worst class (conflicting): the lowest per-class accuracy on those images" in n for n in notes)
    assert any("smallest (class, bias) test group has 10 image(s)" in line for line in notes)
    assert result["worst_group"] == {
        "shown": False,
        "smallest_group": 10,
        "min_group_images": MIN_GROUP_IMAGES,
    }
    # the raw matrix (mean over seeds) stays in results.json
    saved = json.loads((root / "report" / "results.json").read_text())["methods"]["vanilla"]
    groups = saved["groups"]
    assert (groups["rows"], groups["columns"], groups["n"]) == ("label", "bias", 2)
    assert groups["count"] == [[10.0] * 10 for _ in range(10)]
    correct, total = weak
    expected = [correct[c][b] / total[c][b] for c in range(10) for b in range(10)]
    assert [v for row in groups["accuracy"] for v in row] == pytest.approx(expected)
    assert saved["test/acc_worst_group"]["mean"] == 0.0


def test_large_groups_keep_the_worst_group_column(tmp_path: Path) -> None:
    """BFFHQ-like: 2 × 2 groups of ≥ 20 test images, so worst-group is the usual figure and stays."""
    root = tmp_path / "bffhq" / "0.5pct"
    write(root, 0, "vanilla", staged_metrics([[25, 5], [10, 25]], [[25, 20], [25, 25]]))
    result = write_report(root)
    assert result["worst_group"]["shown"] and result["worst_group"]["smallest_group"] == 20
    table, notes = table_lines(root)
    row = cells(table)["Vanilla"]
    assert row["worst-group"] == "25.00" and row["worst class (conflicting)"] == "25.00"
    assert any("(every group has ≥ 20 test images here)" in line for line in notes)


def test_every_cell_says_how_many_seeds_it_is_over(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    correct, total = small_groups([60] * 10)
    for seed in (0, 1, 2):
        write(root, seed, "vanilla", staged_metrics(correct, total))
    old = staged_metrics(correct, total)  # written before the measure existed
    del old["test"]["test/acc_conflicting_worst_class"], old["test_groups"]
    write(root, 2, "vanilla", old)
    for seed in (0, 1):  # seed 2 of LfF not run
        write(root, seed, "lff", staged_metrics(correct, total))
    write_report(root)
    table, notes = table_lines(root)
    rows = cells(table)
    assert rows["Vanilla"]["seeds"] == "3" and rows["Vanilla"]["overall ★"] == "70.00 ± 0.00"
    assert rows["Vanilla"]["worst class (conflicting)"] == "66.67 ± 0.00 (2 of 3 seeds)"
    assert rows["LfF"]["seeds"] == "2 of 3 (seed 2 not run)"
    assert rows["LfF"]["worst class (conflicting)"] == "66.67 ± 0.00"  # over all of its row's seeds
    assert any(line.startswith("(k of n seeds): mean over the k of the row's n seeds") for line in notes)


def test_unreadable_metrics_json_drops_that_seed_with_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "cmnist" / "1pct"
    correct, total = small_groups([60] * 10)
    write(root, 0, "vanilla", staged_metrics(correct, total))
    latin1 = write(root, 1, "vanilla", '{"test": {"test/acc": 0.5}, "note": "caf\xe9"}'.encode("latin-1"))
    truncated = write(root, 2, "vanilla", b'{"test": {"test/acc": 0.5')
    only = write(root, 0, "lff", b"\xff\xfe{")
    for seed in (0, 1, 2):  # the gate reads the debias metrics.json too
        write(root, seed, "debias", staged_metrics(correct, total))
        check = root / f"seed{seed}" / "inject" / "injection_check.json"
        check.parent.mkdir(parents=True)
        gate = {"enabled": True, "num_rows": 4, "accepted": 3, "rejected_not_moved": 1, "min_confidence": 0.9}
        check.write_text(json.dumps({"gate": gate}))
    debias = write(root, 1, "debias", b"\x80not utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = write_report(root)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    for path, reason in ((latin1, "not UTF-8"), (truncated, "not valid JSON"), (only, "not UTF-8")):
        assert any(m.startswith(f"{path}: {reason}") and "left out" in m for m in messages), (path, messages)
    assert any(m.startswith(f"{debias}: not UTF-8") for m in messages)
    assert result["methods"]["vanilla"]["unreadable"] == {1: "not UTF-8", 2: "not valid JSON"}
    table, notes = table_lines(root)
    rows = cells(table)
    assert (
        rows["Vanilla"]["seeds"]
        == "1 of 3 (seed 1: metrics.json not UTF-8; seed 2: metrics.json not valid JSON)"
    )
    assert rows["DiffInject"]["seeds"] == "2 of 3 (seed 1: metrics.json not UTF-8)"
    assert "LfF" not in rows
    assert "No readable metrics.json for LfF (seed 0: not UTF-8), so not in the table." in " ".join(notes)
    text = (root / "report" / "results.md").read_text()
    assert "Vanilla: seed 1's metrics.json is not UTF-8, so that seed is left out of the row" in text
    assert math.isclose(result["methods"]["vanilla"]["test/acc"]["mean"], 0.7)  # seed 0 alone
