"""The run report: Vanilla, LfF and DiffInject side by side, with what explains the numbers.

Reads a run root `R = runs/{dataset}/{pct}` (per-seed `metrics.json`, top-K summaries, injection manifests,
`timings.json`, every stage's `pipeline_config.yaml`) and writes `R/report/`: `results.json`,
`results.md` (compact table first), `accuracy.png` (grouped bars, std error bars) and `samples.png` (real
images, unconditional DDIM samples of the diffusion model, style / content / synthetic; `report.samples`).
Accuracies are mean ± sample std (ddof = 1) over seeds. A method that was not run has no row (a line under the
table names it); an unreadable input raises an error naming the file, except a seed's metrics.json, which is
left out with a warning naming it (the row's "seeds" cell says which seed is missing and why). The table's
columns, and why worst-group is one only for large test groups: `render.column_notes`, `groups`.

    python -m diffinject.report runs/cmnist/1pct [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffinject.data.tempdirs import write_text_atomic
from diffinject.report import synthetic as rs
from diffinject.report.gate import collect_gate
from diffinject.report.groups import worst_group_rule
from diffinject.report.inputs import (
    METHODS,
    collect_configs,
    collect_method,
    collect_timings,
    collect_topk,
    discover_seeds,
)
from diffinject.report.render import accuracy_figure, compact_table, markdown
from diffinject.report.samples import write_samples


def json_safe(node: Any) -> Any:
    """NaN/inf → null, so results.json stays strict JSON (an empty test group gives NaN)."""
    if isinstance(node, dict):
        return {str(key): json_safe(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [json_safe(value) for value in node]
    if isinstance(node, float) and not math.isfinite(node):
        return None
    return node


def unbiased_column(root: Path, seeds: Sequence[int]) -> tuple[str, str]:
    """Which column is the dataset's unbiased accuracy (the data module says; BFFHQ: conflicting)."""
    located = next(
        (f for f in (rs.find_data_config(root, s) for s in seeds) if f), None
    ) or rs.find_data_config(root, None)
    subset = "all"
    if located is not None:
        try:
            data_class = rs.resolve_class(located[1]["class_path"])
        except (ImportError, ValueError) as error:
            raise ValueError(f"{located[0]}: {error}") from error
        subset = located[1].get("init_args", {}).get("unbiased_test_subset") or getattr(
            data_class, "unbiased_test_subset", "all"
        )
    elif root.parent.name == "bffhq":
        subset = "conflicting"
    if subset == "conflicting":
        return "conflicting", "dataset convention: accuracy on the bias-conflicting test images"
    return "overall", "the whole bias-balanced test set"


def write_report(
    root: str | Path, seeds: Sequence[int] | None = None, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    """Write `{root}/report/` (results.json, results.md, accuracy.png, samples.png); print the table."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run root {root} does not exist (expected runs/<dataset>/<pct>)")
    seeds = list(seeds) if seeds is not None else discover_seeds(root)
    report_dir = root / "report"
    column, note = unbiased_column(root, seeds)
    results: dict[str, Any] = {
        "root": str(root),
        "dataset": root.parent.name,
        "pct": root.name,
        "seeds": seeds,
        "std": "sample (ddof=1)",
        "unbiased_column": column,
        "unbiased_note": note,
        "methods": {stage: {"name": name, **collect_method(root, stage, seeds)} for stage, name in METHODS},
        "selection": "best.ckpt maximises each method's validation metric (column 'selected on'); never test",
        "topk": collect_topk(root, seeds),
        "timings": collect_timings(root, seeds, timings),
        "configs": collect_configs(root, seeds),
        "notes": [],
    }
    # The biased validation split tends to pick an early epoch; the last epoch's test is reported beside it.
    for stage, name in METHODS:
        last = collect_method(root, f"{stage}/last_epoch", seeds)
        if last["n"]:
            results["methods"][f"{stage}/last_epoch"] = {"name": f"{name}, last epoch", **last}
    results["worst_group"] = worst_group_rule(results["methods"])
    for entry in results["methods"].values():
        for seed, reason in entry["unreadable"].items():
            results["notes"].append(
                f"{entry['name']}: seed {seed}'s metrics.json is {reason}, "
                "so that seed is left out of the row"
            )
    synthetic, sample = rs.collect_synthetic(root, seeds, report_dir)
    samples, sample_notes = write_samples(report_dir / "samples.png", root, seeds, sample)
    figures: dict[str, str | None] = {"accuracy": None, "samples": str(samples) if samples else None}
    results["notes"] += sample_notes
    control = results["configs"]["knobs"].get("debias", {}).get("synthetic_control")
    if control not in (None, "none"):
        results["notes"].append(
            f"the debias stage trained with synthetic_control={control}: the synthetic-set measurements and "
            "samples.png show the injection manifest's images and labels, not the control data it trained on"
        )
    results["synthetic"] = synthetic
    results["generated"] = rs.collect_generated(root, seeds, report_dir)
    results["gate"] = collect_gate(root, seeds)
    results["notes"] += (results["gate"] or {}).get("notes", [])
    fell_back = [
        s for s, g in ((results["gate"] or {}).get("per_seed") or {}).items() if g.get("debias_fallback")
    ]
    if fell_back and "debias" in results["methods"]:  # the row must not read as the method's result
        total = results["methods"]["debias"].get("n") or len(seeds)
        suffix = f" (plain ERM on {len(fell_back)} of {total} seeds: the gate accepted no image)"
        for key in ("debias", "debias/last_epoch"):
            if key in results["methods"]:
                results["methods"][key]["name"] += suffix
    accuracy = accuracy_figure(report_dir / "accuracy.png", results)
    figures["accuracy"] = str(accuracy) if accuracy else None
    if accuracy is None:
        results["notes"].append("accuracy.png not written: no method has test metrics yet")
    missing = [name for stage, name in METHODS if results["methods"][stage]["n"] == 0]
    if missing:
        results["notes"].append(f"no result, so no row: {', '.join(missing)}")
    results["figures"] = figures
    write_text_atomic(
        report_dir / "results.json",
        json.dumps(json_safe(results), indent=2, default=str, allow_nan=False) + "\n",
    )
    write_text_atomic(report_dir / "results.md", markdown(results))
    print(compact_table(results), flush=True)
    for line in (synthetic or {}).get("notes", []) + results["notes"]:
        print(f"[report] note: {line}", flush=True)
    print(f"[report] wrote {report_dir}/results.md, results.json and figures", flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m diffinject.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="run root, e.g. runs/cmnist/1pct")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed* folder")
    args = parser.parse_args(argv)
    return write_report(args.root, seeds=args.seeds)


if __name__ == "__main__":
    main()
