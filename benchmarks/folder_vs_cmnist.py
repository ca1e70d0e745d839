"""Classifier stages through `DATASET=folder` vs `DATASET=cmnist` on the same images (issue 20 §3); JSON out.

Usage: python benchmarks/folder_vs_cmnist.py [--epochs 20] [--stages bias vanilla] [--pct 1pct]
                                             [--interleaved-epochs 5] [--repeats 1] [--workdir DIR]
                                             [--out FILE]

The embedded CMNIST (3,600 train + 400 valid + 1,000 test at 1pct) is exported to a tree in a temporary folder
(`data.export`), then each stage runs twice through the real pipeline (`workflow.pipeline`, one job, one
thread, `--seeds 0`, max_epochs set by a variant): once as `--dataset cmnist` (embedded source), once as
`--dataset folder` on the tree (`--repeats` pairs, in ABBA order). Reported per stage: the wall times of
its fit + tests (the pipeline's `timings.json`), the ratio of their sums folder / cmnist (goal ≤ 1.15), and
whether `metrics.json`'s test and validation numbers and the selected epoch are equal in every run (goal:
digit for digit).

The two pipelines run one after the other, so load from other jobs on the machine lands on one more than the
other. `in_process` is fairer on a shared machine: both data modules, as the stage config builds them, set up
in one process, then epochs of (train loader + the stage's network forward/backward/Adam step) alternate
between them; it also times the per-item decode of every epoch (`decode_once: false`, the old path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # before torch: this process and the stages

import torch  # noqa: E402
import yaml  # noqa: E402

from diffinject.data import CMNISTDataModule  # noqa: E402
from diffinject.data.export import export_datamodule  # noqa: E402
from diffinject.report.synthetic import resolve_class  # noqa: E402
from diffinject.workflow import pipeline  # noqa: E402
from diffinject.workflow.configs import Options, stage_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GOAL = 1.15


def _run_pipeline(args: argparse.Namespace, work: Path, dataset: str, variant: Path, repeat: int) -> Path:
    runs = work / f"runs-{dataset}-{repeat}"
    argv = ["--dataset", dataset, "--pct", args.pct, "--seeds", "0", "--jobs", "1", "--no-report"]
    argv += ["--runs", str(runs), "--configs", str(REPO / "configs")]
    argv += ["--variant", str(variant), "--stages", *args.stages]
    if dataset == "folder":
        argv += ["--name", "cmnist", "--data-root", str(work / "tree")]
    else:  # an empty root: source 'auto' resolves to the embedded digits, never a tree under ./data
        argv += ["--data-root", str(work / "empty")]
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)  # the stages' output (progress bars) goes to stderr; stdout keeps only the JSON
    try:
        pipeline.main(argv)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    return runs / ("folder/cmnist" if dataset == "folder" else "cmnist") / args.pct


def _numbers(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"test": metrics["test"], "val": metrics["val"], "epoch": metrics["checkpoint_epoch"]}


def pipelines(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each stage's wall time (fit + tests) per dataset, repeats in ABBA order; metrics compared."""
    variant = work / "epochs.yaml"
    variant.write_text(yaml.safe_dump({s: {"trainer": {"max_epochs": args.epochs}} for s in args.stages}))
    seconds: dict[str, dict[str, list[float]]] = {s: {"cmnist": [], "folder": []} for s in args.stages}
    numbers: dict[str, dict[str, list]] = {s: {"cmnist": [], "folder": []} for s in args.stages}
    for repeat in range(args.repeats):
        order = ("cmnist", "folder") if repeat % 2 == 0 else ("folder", "cmnist")
        for dataset in order:
            root = _run_pipeline(args, work, dataset, variant, repeat)
            timings = json.loads((root / "timings.json").read_text())
            for stage in args.stages:
                seconds[stage][dataset].append(round(timings[f"seed0/{stage}"], 2))
                metrics = json.loads((root / f"seed0/{stage}" / "metrics.json").read_text())
                numbers[stage][dataset].append(_numbers(metrics))
    stages = {}
    for stage in args.stages:
        cmnist, folder = seconds[stage]["cmnist"], seconds[stage]["folder"]
        runs = numbers[stage]["cmnist"] + numbers[stage]["folder"]
        stages[stage] = {
            "cmnist_s": cmnist,
            "folder_s": folder,
            "ratio": round(sum(folder) / sum(cmnist), 3),
            "metrics_equal": all(run == runs[0] for run in runs),
            "test_acc": runs[0]["test"].get("test/acc"),
        }
    return stages


def _modules(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The bias stage's data modules as the pipeline configures them (+ the folder one, per-item decode)."""
    configs = str(REPO / "configs")
    cmnist = Options(dataset="cmnist", pct=args.pct, data_root=str(work / "empty"), configs=configs)
    folder = Options(
        dataset="folder", name="cmnist", pct=args.pct, data_root=str(work / "tree"), configs=configs
    )
    sections = {
        name: stage_config(opts, "bias", 0) for name, opts in (("cmnist", cmnist), ("folder", folder))
    }
    sections["folder_per_item"] = json.loads(json.dumps(sections["folder"]))
    sections["folder_per_item"]["data"]["init_args"]["decode_once"] = False
    return sections


def in_process(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    configs = _modules(args, work)
    setup_s, loaders, nets = {}, {}, {}
    for name, config in configs.items():
        start = time.perf_counter()
        module = resolve_class(config["data"]["class_path"])(**config["data"]["init_args"])
        module.setup("fit")
        module.setup("test")
        setup_s[name] = round(time.perf_counter() - start, 3)
        loaders[name] = module.train_dataloader()
        torch.manual_seed(0)
        model_cls = resolve_class("diffinject.stages." + config["model"]["class_path"])
        nets[name] = model_cls(**config["model"]["init_args"]).net
    epochs: dict[str, list[float]] = {name: [] for name in configs}
    for epoch in range(args.interleaved_epochs):
        order = list(configs) if epoch % 2 == 0 else list(reversed(configs))
        for name in order:
            net = nets[name]
            optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
            torch.manual_seed(epoch)
            start = time.perf_counter()
            for batch in loaders[name]:
                loss = torch.nn.functional.cross_entropy(net(batch["image"]), batch["label"])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            epochs[name].append(time.perf_counter() - start)
    median = {name: round(statistics.median(times), 4) for name, times in epochs.items()}
    return {
        "setup_s": setup_s,
        "epoch_s_median": median,
        "epochs": args.interleaved_epochs,
        "ratio_folder": round(median["folder"] / median["cmnist"], 3),
        "ratio_folder_per_item": round(median["folder_per_item"] / median["cmnist"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20, help="max_epochs of every stage (configs: 100)")
    parser.add_argument(
        "--stages", nargs="+", default=["bias", "vanilla"], choices=["bias", "vanilla", "lff"]
    )
    parser.add_argument("--pct", default="1pct")
    parser.add_argument("--interleaved-epochs", type=int, default=5, help="0: skip the in-process part")
    parser.add_argument("--repeats", type=int, default=1, help="pipeline pairs, in ABBA order")
    parser.add_argument("--workdir", default=None, help="keep the tree and runs here (default: a temp dir)")
    parser.add_argument("--out", default=None, help="also write the JSON to this file")
    args = parser.parse_args()
    if "vanilla" in args.stages and "bias" not in args.stages:
        parser.error("vanilla selects its checkpoint with the bias model: add bias to --stages")
    with tempfile.TemporaryDirectory(prefix="folder_vs_cmnist-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        (work / "empty").mkdir(parents=True, exist_ok=True)
        source = CMNISTDataModule(root=str(work / "empty"), ratio=args.pct, source="embedded")
        start = time.perf_counter()
        export_datamodule(source, work / "tree")
        export_s = time.perf_counter() - start
        result: dict[str, Any] = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "pct": args.pct,
            "epochs": args.epochs,
            "export_s": round(export_s, 2),
        }
        if args.interleaved_epochs > 0:
            result["in_process"] = in_process(args, work)
        stages = pipelines(args, work)
        result["stages"] = stages
        result["goal"] = {
            "ratio_at_most": GOAL,
            "met": all(s["ratio"] <= GOAL and s["metrics_equal"] for s in stages.values()),
        }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
