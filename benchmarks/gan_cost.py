"""Wall time of the generative baselines (issue 22's cost goals), one seed, stage after stage, as the pipeline
runs them: the shared A² source GAN, A² per seed (adapt + invert/render), AmpliBias per seed (fit + generate),
and one classifier row. Prints JSON (and appends it to `--out` when given).

It builds a fresh run root under `--work` whose seed folder links to an existing run's bias stage (the GANs
read its top-K and model; the bias stage is not timed), then runs
`python -m diffinject.workflow.pipeline --stages a2 amplibias --jobs 1` in it with `OMP_NUM_THREADS=1` (the
pipeline's CPU setting: two threads were slower for these small nets) and reads its `timings.json`. Run it on
a quiet machine: the figures are only meaningful alone.

    python benchmarks/gan_cost.py --run runs/cmnist/1pct --seed 0 --out benchmarks/results/gan_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: the issue's budgets on 2 CPU cores, seconds
GOALS = {"a2_source": 360, "a2_per_seed": 180, "amplibias_per_seed": 180}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a run root with seed{S}/bias, e.g. runs/cmnist/1pct")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/gan_cost", help="scratch runs root (emptied first)")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default=None, help="append the JSON line to this file")
    args = parser.parse_args()
    run = Path(args.run).resolve()
    dataset, pct = run.parent.name, run.name
    bias = run / f"seed{args.seed}" / "bias"
    if not (bias / "topk.csv").is_file():
        raise SystemExit(f"{bias}/topk.csv not found: run the bias stage first (make pipeline)")
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    seed_dir = work / dataset / pct / f"seed{args.seed}"
    seed_dir.mkdir(parents=True)
    os.symlink(bias, seed_dir / "bias", target_is_directory=True)
    command = [
        sys.executable, "-m", "diffinject.workflow.pipeline", "--dataset", dataset, "--pct", pct,
        "--seeds", str(args.seed), "--runs", str(work), "--profile", args.profile,
        "--stages", "a2", "amplibias", "--jobs", "1", "--no-report",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - started
    timings = json.loads((work / dataset / pct / "timings.json").read_text())
    seed = f"seed{args.seed}"
    stages = {key: round(value, 1) for key, value in timings.items()}
    figures = {
        "a2_source": timings["a2_source"],
        "a2_per_seed": timings[f"{seed}/a2_adapt"] + timings[f"{seed}/a2_translate"],
        "amplibias_per_seed": timings[f"{seed}/amplibias_gan"] + timings[f"{seed}/amplibias_generate"],
    }
    result = {
        "benchmark": "gan_cost",
        "run": str(run),
        "seed": args.seed,
        "profile": args.profile,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": 1,
        "stages_s": stages,
        **{f"{key}_s": round(value, 1) for key, value in figures.items()},
        "goals_s": GOALS,
        "within_goal": {key: figures[key] <= limit for key, limit in GOALS.items()},
        "pipeline_wall_s": round(wall, 1),
    }
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
