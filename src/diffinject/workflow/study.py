"""`make study`: the ablation table — one pipeline run per variant file, sharing unchanged upstream stages.

A variant is a YAML file with per-stage overrides (the shape of a profile file), e.g.
`configs/cmnist/study/gamma03.yaml`. Each variant runs under `{runs}/study/{variant}/{dataset}/{pct}`;
the stages it does not override are linked from the base run (`{runs}/{dataset}/{pct}`, which
`make pipeline` builds), so a variant that only changes the injection reruns only inject → debias. The
table (`{runs}/study/{dataset}-{pct}.md|json`) has one row per variant: its overrides, the accuracies
(mean ± std over seeds), top-K precision and the synthetic set's measured conflict rate ("n/a" for a
`synthetic_control` row: the measurements read the inject manifest, not the control's training data).

    python -m diffinject.workflow.study --dataset cmnist --pct 1pct --seeds 0 1 2 configs/cmnist/study/*.yaml

Your own tree (`DATASET=folder`): `--name NAME --data-root DATA_ROOT`, base `{runs}/folder/{NAME}/{pct}`,
table `{runs}/study/folder-{NAME}-{pct}.md|json`; a variant file written for CMNIST works when its overrides
are not CMNIST-specific (e.g. `control_oversample.yaml`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffinject.report import write_report
from diffinject.workflow import pipeline
from diffinject.workflow.configs import (
    BASELINES,
    EXTRA_BASELINES,
    GAN_ROWS,
    GENERATORS,
    PER_SEED_STAGES,
    SHARED_GENERATORS,
    load_variant,
    path_component,
)
from diffinject.workflow.folder import HEADLINES
from diffinject.workflow.lock import LockHeld, pipeline_lock

#: stages a base run made by `make pipeline` does not have (`make baselines` adds them)
OPTIONAL_STAGES = (*EXTRA_BASELINES, *SHARED_GENERATORS, *GENERATORS, *GAN_ROWS)
#: stage → the stages it feeds; a variant overriding a stage reruns it and everything downstream
DOWNSTREAM = {
    "bias": ("bias", "inject", "debias"),
    "topk": ("bias", "inject", "debias"),
    "diffusion": ("diffusion", "inject", "debias"),
    "inject": ("inject", "debias"),
    "debias": ("debias",),
    **{stage: (stage,) for stage in BASELINES},
    **{row: (row,) for row in GAN_ROWS},  # a row's retraining; its generator stages are linked from the base
    "vanilla": ("vanilla", "inject", "debias"),  # the inject gate's premise check reads the Vanilla model
}


def stages_to_run(variant: dict[str, Any]) -> list[str]:
    """The stages a variant rebuilds: each overridden stage and everything downstream of it."""
    run: set[str] = set()
    for stage, override in variant.items():
        if stage not in DOWNSTREAM:
            raise ValueError(f"variant section {stage!r}: expected stages {', '.join(DOWNSTREAM)}")
        if override:
            run.update(DOWNSTREAM[stage])
    return [s for s in pipeline.ALL_STAGES if s in run]


def link_shared(base: Path, root: Path, seeds: Sequence[int], running: Sequence[str]) -> None:
    """Symlink the base run's stage folders the variant does not rebuild (absolute targets).

    The folders follow the variant file as it is now: a stage it rebuilds loses an old link (it gets its own
    folder), a stage it no longer overrides has its own folder from an earlier version replaced by the link.
    """
    folders = [("diffusion", base / "diffusion", root / "diffusion")]
    folders += [(stage, base / stage, root / stage) for stage in SHARED_GENERATORS]
    for seed in seeds:
        for stage in PER_SEED_STAGES:
            folders.append((stage, base / f"seed{seed}" / stage, root / f"seed{seed}" / stage))
    for stage, target, link in folders:
        if stage in running:
            if link.is_symlink():
                link.unlink()
            continue
        if not target.exists():
            if stage in OPTIONAL_STAGES:  # `make baselines` only: a base run without them is complete
                continue
            raise FileNotFoundError(f"{target} is missing: run `make pipeline` for the base run first")
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        os.symlink(target.resolve(), link, target_is_directory=True)


def describe(node: Any, path: tuple[str, ...] = ()) -> list[str]:
    """Flatten overrides into `stage.section.key=value` strings for the table (`init_args` left out)."""
    if not isinstance(node, dict):
        return [f"{'.'.join(path)}={node}"]
    if "class_path" in node:  # a swapped class: one entry, `Class(arg=value, ...)`
        args = ", ".join(f"{k}={v}" for k, v in (node.get("init_args") or {}).items())
        return [f"{'.'.join(path)}={node['class_path']}({args})"]
    items: list[str] = []
    for key, value in node.items():
        items += describe(value, path if key == "init_args" else (*path, str(key)))
    return items


def synthetic_control_of(results: dict[str, Any]) -> str | None:
    """The debias stage's `synthetic_control` as it ran (None: the manifest's own images and labels)."""
    control = ((results.get("configs") or {}).get("knobs") or {}).get("debias", {}).get("synthetic_control")
    return None if control in (None, "none") else str(control)


def row_of(name: str, variant: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    synthetic = (results.get("synthetic") or {}).get("summary", {})
    control = synthetic_control_of(results)
    row = {
        "variant": name,
        "overrides": describe(variant) or ["(defaults)"],
        "methods": dict(results["methods"]),
        "topk_precision": (results.get("topk") or {}).get("precision"),
        "synthetic_conflict_rate": synthetic.get("colour.conflict_rate"),
        "synthetic_shape_is_label": synthetic.get("shape.shape_is_label"),
        "synthetic_recombination": synthetic.get("recombination.recombination"),
        "synthetic_control": control,
        # what this variant rebuilt: a variant of other rows (e.g. the GAN rows) gets a line per row it reran
        "reran": stages_to_run(variant),
    }
    if control is not None:
        # The report measures the inject manifest's images and labels; a control trained on something else.
        row["synthetic_conflict_rate"] = row["synthetic_shape_is_label"] = None
        row["synthetic_recombination"] = None
    return row


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The stored table rows (re-read before each update, so concurrent studies keep each other's rows)."""
    path = out.with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else []


def _pct(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{100 * stat['mean']:.1f} ± {100 * (stat.get('std') or 0):.1f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per variant; accuracies of the debias stage (best-val checkpoint and last epoch) in %.

    A variant that reruns other classifier rows (say the GAN rows under another recipe) gets a line for each.
    """
    header = [
        "variant", "overrides", "DiffInject overall", "conflicting", "overall, last epoch",
        "top-K precision", "synthetic conflict rate", "synthetic shape = label", "recombinations",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        debias = row["methods"].get("debias") or {}
        last = row["methods"].get("debias/last_epoch") or {}
        control = row.get("synthetic_control")
        measured = [
            _pct(row["synthetic_conflict_rate"]), _pct(row["synthetic_shape_is_label"]),
            _pct(row.get("synthetic_recombination")),
        ]  # fmt: skip
        if control:  # the synthetic-set columns measure the manifest, not the control's training data
            measured = [f"n/a (control: {control})"] * 3
        cells = [
            row["variant"], "<br>".join(row["overrides"]), _pct(debias.get("test/acc")),
            _pct(debias.get("test/acc_conflicting")), _pct(last.get("test/acc")), _pct(row["topk_precision"]),
            *measured,
        ]  # fmt: skip
        reran = row.get("reran")  # absent in rows stored before it was recorded: the debias line only
        if (
            reran is not None and "debias" not in reran
        ):  # the base run's DiffInject, linked: not this variant's
            cells[2:5] = ["(base run)"] * 3
        lines.append("| " + " | ".join(cells) + " |")
        for stage in [s for s in reran or () if s not in ("bias", "debias") and s in row["methods"]]:
            result, result_last = row["methods"][stage], row["methods"].get(f"{stage}/last_epoch") or {}
            accuracies = [_pct(result.get("test/acc")), _pct(result.get("test/acc_conflicting"))]
            lines.append(
                f"| {row['variant']}: {stage} | (row) | "
                + " | ".join([*accuracies, _pct(result_last.get("test/acc")), *["–"] * 4])
                + " |"
            )
    return "\n".join(lines) + "\n"


def run_variant(
    file: str,
    variant: dict[str, Any],
    root: Path,
    running: Sequence[str],
    base: Path,
    study_runs: Path,
    args: argparse.Namespace,
) -> None:
    """Link the shared stages into the variant's root, then run its pipeline (or only report it)."""
    link_shared(base, root, args.seeds, running)
    print(f"[study] {Path(file).stem}: stages {' '.join(running)}", flush=True)
    common = ["--dataset", args.dataset, "--pct", args.pct, "--profile", args.profile]
    common += ["--trainer", args.trainer, "--runs", str(study_runs), "--variant", file]
    common += ["--seeds", *map(str, args.seeds), "--stages", *running]
    if args.data_root is not None:
        common += ["--data-root", args.data_root]
    if args.name is not None:
        common += ["--name", args.name, "--headline", args.headline]
    if args.jobs is not None:
        common += ["--jobs", str(args.jobs)]
    if running:
        pipeline.main(common)
    else:  # no override: the base run itself, reported from its links
        write_report(root, seeds=args.seeds)


def main(argv: Sequence[str] | None = None) -> None:
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m diffinject.workflow.study", description=description)
    parser.add_argument("variants", nargs="+", help="variant YAML files")
    parser.add_argument("--dataset", default="cmnist")
    parser.add_argument("--pct", default="1pct")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--trainer", default="cpu")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--data-root", default=None, help="as for the pipeline (user-supplied datasets)")
    parser.add_argument("--name", default=None, help="DATASET=folder: the tree's folder under --data-root")
    parser.add_argument(
        "--headline", default="all", choices=HEADLINES, help="DATASET=folder, as for the pipeline"
    )
    args = parser.parse_args(argv)
    if args.dataset == "folder" and not args.name:
        parser.error("--dataset folder needs --name (NAME=<the tree's folder under DATA_ROOT>)")
    dataset_dir = (
        Path(args.dataset, path_component(args.name, "NAME"))
        if args.dataset == "folder"
        else Path(args.dataset)
    )
    base = Path(args.runs) / dataset_dir / args.pct
    out = Path(args.runs) / "study" / f"{'-'.join(dataset_dir.parts)}-{args.pct}"
    try:  # every file checked before the first variant runs (hours before a typo in the last one)
        variants = {file: load_variant(Path(file)) for file in args.variants}
        for variant in variants.values():
            stages_to_run(variant)
    except (FileNotFoundError, ValueError) as error:
        print(f"[study] cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ["python", "-m", "diffinject.workflow.study", *(sys.argv[1:] if argv is None else argv)]
    for file, variant in variants.items():
        name = Path(file).stem
        running = stages_to_run(variant)
        study_runs = Path(args.runs) / "study" / name
        root = study_runs / dataset_dir / args.pct
        try:  # the variant's root, held across linking and its pipeline (which re-enters the lock)
            with pipeline_lock(root, command):
                run_variant(file, variant, root, running, base, study_runs, args)
        except LockHeld as error:
            print(f"[study] cannot run {name}: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        results = json.loads((root / "report" / "results.json").read_text())
        # Rows of earlier (or concurrent) invocations stay; a variant run again replaces its own row.
        rows = [row for row in read_rows(out) if row["variant"] != name] + [row_of(name, variant, results)]
        # Rewritten after every variant, so a long study shows its table as it goes.
        out.with_suffix(".json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(table(rows))
    print(table(read_rows(out)), flush=True)


if __name__ == "__main__":
    main()
