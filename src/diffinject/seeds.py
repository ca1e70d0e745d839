"""Run classifier stages for several seeds and aggregate their `metrics.json` into mean ± std tables.

Layout (one folder per seed, one per stage inside it):
    {root}/seed{S}/{stage}/           fit + test of configs/{dataset}/{stage}.yaml with --seed_everything S
    {root}/seed{S}/{stage}/last_epoch/metrics.json   the last epoch's weights on the same test, for reference
                                      (a biased validation split tends to select an early epoch)
    {root}/seed{S}/bias/topk.csv      top-K of that seed's bias classifier (configs/{dataset}/topk.yaml)
    {root}/baselines.json|md          the aggregate (mean ± sample std over seeds, ddof = 1)
    {root}/timings.json               wall seconds of every command run
Only the training seed changes between seeds; the dataset (its `data.seed`) stays fixed, as in DisEnt/LfF.
Each (stage, seed) is skipped when its `metrics.json` (top-K: `topk_summary.json`) already exists.

    python -m diffinject.seeds run runs/cmnist/1pct --dataset cmnist --seeds 0 1 2 --stages vanilla lff bias
    python -m diffinject.seeds aggregate runs/cmnist/1pct --stages vanilla lff bias
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRIC_COLUMNS = (
    ("test/acc", "acc"),
    ("test/acc_aligned", "aligned"),
    ("test/acc_conflicting", "conflicting"),
    ("test/acc_worst_group", "worst-group"),
    ("val/acc", "val acc"),
)


def run_dir(root: str | Path, seed: int, stage: str) -> Path:
    return Path(root) / f"seed{seed}" / stage


def stage_commands(
    root: str | Path,
    dataset: str,
    stage: str,
    seed: int,
    configs: str = "configs",
    extra: Sequence[str] = (),
    trainer_preset: str | None = None,
    eval_last: bool = True,
) -> list[tuple[str, list[str], Path]]:
    """(name, CLI argv, output that marks it done) for one (stage, seed): fit, test, the last epoch's test
    (`eval_last`) and, for bias, top-K.

    fit resumes from `last.ckpt` when an earlier fit was interrupted (a finished fit then returns at once).
    """
    out = run_dir(root, seed, stage)
    config = str(Path(configs) / dataset / f"{stage}.yaml")
    preset = ["--trainer", trainer_preset] if trainer_preset else []

    def place(folder: Path, save_dir: Path, name: str) -> list[str]:
        return [
            "--trainer.default_root_dir", str(folder),
            "--trainer.logger.init_args.save_dir", str(save_dir),
            "--trainer.logger.init_args.name", name,
        ]  # fmt: skip

    common = [*preset, "--seed_everything", str(seed), *place(out, out.parent, stage)]
    best, last = out / "checkpoints" / "best.ckpt", out / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", str(last)] if last.is_file() else []
    commands = [
        ("fit", ["fit", "--config", config, *common, *extra, *resume], best),
        (
            "test",
            ["test", "--config", config, *common, *extra, "--ckpt_path", str(best)],
            out / "metrics.json",
        ),
    ]
    if eval_last:
        last_dir = out / "last_epoch"
        argv = ["test", "--config", config, *preset, "--seed_everything", str(seed)]
        argv += [*place(last_dir, out, "last_epoch"), *extra, "--ckpt_path", str(last)]
        commands.append(("test_last", argv, last_dir / "metrics.json"))
    if stage == "bias":
        topk = ["predict", "--config", str(Path(configs) / dataset / "topk.yaml"), *preset]
        topk += ["--seed_everything", str(seed), *place(out / "topk", out, "topk")]
        topk += ["--trainer.callbacks.init_args.output", str(out / "topk.csv")]
        topk += ["--model.init_args.weights", str(best), *extra]
        commands.append(("topk", topk, out / "topk_summary.json"))
    return commands


def run_seeds(
    root: str | Path,
    dataset: str,
    seeds: Sequence[int],
    stages: Sequence[str],
    configs: str = "configs",
    extra: Sequence[str] = (),
    trainer_preset: str | None = None,
    eval_last: bool = True,
) -> dict[str, float]:
    """Run every missing command, each in a subprocess (fresh seeds and memory); returns wall seconds each.

    Skips test (and fit) when `metrics.json` exists and top-K when `topk_summary.json` exists.
    """
    timings_path = Path(root) / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    for seed in seeds:
        for stage in stages:
            commands = {
                name: (argv, done)
                for name, argv, done in stage_commands(
                    root, dataset, stage, seed, configs, extra, trainer_preset, eval_last
                )
            }
            tested = commands["test"][1].is_file()
            todo = [
                name for name in commands if not (tested if name == "fit" else commands[name][1].is_file())
            ]
            if not todo:
                print(f"[seeds] skip seed {seed} {stage}: done", flush=True)
            for name in todo:
                argv = commands[name][0]
                print(f"[seeds] seed {seed} {stage} {name}: diffinject {shlex.join(argv)}", flush=True)
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "diffinject", *argv], check=True)
                timings[f"seed{seed}/{stage}/{name}"] = round(time.perf_counter() - start, 2)
                timings_path.parent.mkdir(parents=True, exist_ok=True)
                timings_path.write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
    return timings


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the non-missing values."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(clean) / len(clean)
    var = sum((v - mean) ** 2 for v in clean) / (len(clean) - 1) if len(clean) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(clean), "values": list(values)}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def _collect(files: dict[int, Path], seeds: Sequence[int]) -> dict[str, Any] | None:
    """mean ± std of every test/val metric over the seeds whose metrics.json exists (None if none does)."""
    present = {seed: _read_json(path) for seed, path in files.items() if path.is_file()}
    if not present:
        return None
    entry: dict[str, Any] = {"seeds": sorted(present), "missing_seeds": sorted(set(seeds) - set(present))}
    keys = sorted({k for m in present.values() for k in (m.get("test") or {})})
    keys += sorted({k for m in present.values() for k in (m.get("val") or {}) if k.startswith("val/")})
    for key in keys:
        split = key.split("/")[0]
        entry[key] = mean_std([(m.get(split) or {}).get(key) for m in present.values()])
    return entry


def aggregate(root: str | Path, stages: Sequence[str], seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """Collect `{root}/seed*/{stage}/metrics.json` (and bias top-K summaries) into mean ± std per metric."""
    root = Path(root)
    if seeds is None:
        found = {int(p.name[4:]) for p in root.glob("seed*") if p.is_dir() and p.name[4:].isdigit()}
        seeds = sorted(found)
    result: dict[str, Any] = {"root": str(root), "seeds": list(seeds), "std": "sample (ddof=1)", "stages": {}}
    for stage in stages:
        entry = _collect({s: run_dir(root, s, stage) / "metrics.json" for s in seeds}, seeds)
        if entry is None:
            raise FileNotFoundError(f"no metrics.json for stage {stage!r} under {root}/seed*/{stage}/")
        summaries = [run_dir(root, s, stage) / "topk_summary.json" for s in entry["seeds"]]
        summaries = [_read_json(p) for p in summaries if p.is_file()]
        if summaries:
            entry["topk/precision"] = mean_std([s.get("precision") for s in summaries])
            entry["topk/recall"] = mean_std([s.get("recall") for s in summaries])
            entry["topk/max_precision"] = mean_std([s.get("max_precision") for s in summaries])
            entry["topk/k"] = summaries[0].get("k")
            entry["topk/per_class"] = summaries[0].get("per_class")
        result["stages"][stage] = entry
        last = _collect({s: run_dir(root, s, stage) / "last_epoch" / "metrics.json" for s in seeds}, seeds)
        if last is not None:
            result["stages"][f"{stage} (last epoch)"] = last
    timings = root / "timings.json"
    if timings.is_file():
        result["timings_s"] = _read_json(timings)
    return result


def _fmt(stat: dict[str, Any] | None) -> str:
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}"


def markdown_table(result: dict[str, Any]) -> str:
    """Percentages, mean ± std over seeds; one row per stage."""
    header = ["stage", "seeds", *(label for _, label in METRIC_COLUMNS), "top-K precision", "top-K recall"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for stage, entry in result["stages"].items():
        cells = [stage, str(len(entry["seeds"]))]
        cells += [_fmt(entry.get(key)) for key, _ in METRIC_COLUMNS]
        cells += [_fmt(entry.get("topk/precision")), _fmt(entry.get("topk/recall"))]
        lines.append("| " + " | ".join(cells) + " |")
    note = (
        f"\nTest accuracy in % (mean ± sample std over seeds {result['seeds']}); acc = overall (micro) on "
        "the whole test set; worst-group = min over (label, bias) groups; val acc = biased validation split "
        "of the selected checkpoint; top-K precision = fraction of the top-K that is bias-conflicting; "
        "top-K recall = fraction of all conflicting training items that the top-K contains.\n"
    )
    return "\n".join(lines) + "\n" + note


def write_aggregate(root: str | Path, stages: Sequence[str], seeds: Sequence[int] | None = None) -> Path:
    result = aggregate(root, stages, seeds)
    out = Path(root) / "baselines.json"
    for path, text in (
        (out, json.dumps(result, indent=2) + "\n"),
        (out.with_suffix(".md"), markdown_table(result)),
    ):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    print(markdown_table(result), flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m diffinject.seeds", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="fit + test (+ top-K for bias) per seed and stage, then aggregate")
    run.add_argument("root", help="e.g. runs/cmnist/1pct")
    run.add_argument("--dataset", required=True, help="configs/<dataset>/<stage>.yaml")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--stages", nargs="+", default=["vanilla", "lff", "bias"])
    run.add_argument("--configs", default="configs")
    run.add_argument("--trainer-preset", default=None, help="e.g. configs/trainer/cpu.yaml")
    run.add_argument("--no-eval-last", action="store_true", help="skip testing the last epoch's weights")
    run.add_argument("--extra", default="", help="extra CLI arguments for every command, one quoted string")
    agg = sub.add_parser("aggregate", help="mean ± std of metrics.json over seed folders")
    agg.add_argument("root")
    agg.add_argument("--stages", nargs="+", default=["vanilla", "lff", "bias"])
    agg.add_argument("--seeds", type=int, nargs="+", default=None, help="default: every seed* folder")
    args = parser.parse_args(argv)
    if args.command == "run":
        extra = shlex.split(args.extra)
        run_seeds(
            args.root,
            args.dataset,
            args.seeds,
            args.stages,
            args.configs,
            extra,
            args.trainer_preset,
            eval_last=not args.no_eval_last,
        )
        write_aggregate(args.root, args.stages, args.seeds)
    else:
        write_aggregate(args.root, args.stages, args.seeds)


if __name__ == "__main__":
    main()
