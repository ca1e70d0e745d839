"""`make pipeline`: every DiffInject stage through the `diffinject` CLI, resumable, one line per stage.

Order: bias fit → top-K predict → baselines (vanilla, LfF; DisEnt, LfF+BE, DisEnt+BE with `make baselines`) →
diffusion fit → inject predict → debias fit/test → the generative baselines A² and AmpliBias with their
controls (`make baselines`; `workflow.generative`) → report. A classifier stage whose config sets
`selection_bias` (checkpoint selection with the bias model) waits for its seed's bias stage. Per seed stages
live under `{runs}/{dataset}/{pct}/seed{S}/` (own data: `{runs}/folder/{name}/{pct}/`); the diffusion model is
trained once per (dataset, pct) under `.../diffusion/` (it uses no labels and is by far the most expensive
stage).

Each stage's config is resolved by `workflow.configs.stage_config` (template, profile, variants, run paths;
for `DATASET=folder` the facts read from the tree) and written into the stage folder as
`pipeline_config.yaml`: it is what the CLI runs, so each run folder says exactly how it was produced.
`--diffusion DIR` uses a given export instead of training the diffusion stage.

What is skipped, resumed or rebuilt is decided from the stage folders' records (`workflow.runner`), so it
holds across invocations; the dataset and every input of the planned stages are checked before any stage
starts (`workflow.preflight`, exit code 2), and a failed stage ends the run with a one-screen summary
(exit code 1). One pipeline at a time per run root: a second one on the same root stops before touching any
stage, naming the holder (`workflow.lock`, exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffinject.data.sections import source_data_section
from diffinject.logs import quiet_known_noise
from diffinject.workflow.configs import (
    ALL_STAGES,
    BASELINES,
    DATASETS,
    DEFAULT_STAGES,
    PROFILES,
    RATIO_DATASETS,
    Options,
    path_component,
    pct_to_ratio,
    stage_config,
)
from diffinject.workflow.folder import HEADLINES
from diffinject.workflow.generative import generative_steps
from diffinject.workflow.lock import LockHeld, pipeline_lock
from diffinject.workflow.preflight import CannotStart, check_dataset, check_handovers
from diffinject.workflow.runner import CONFIG_NAME, Runner, Step, StepFailed, failure_summary

#: the export's description file (nets.unet.INFO_FILENAME; not imported: the pipeline needs no diffusers)
INFO_NAME = "diffusion_info.json"


def diffusion_export(path: str) -> tuple[Path, dict[str, Any]]:
    """A given diffusion export (DIFFUSION=<dir>), checked before any stage starts: absolute path, info."""
    folder = Path(path).expanduser().resolve()
    missing = [name for name in ("config.json", INFO_NAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"DIFFUSION={path}: {folder} is not a diffusion export (missing {', '.join(missing)}); expected "
            "the unet/ folder a diffusion stage writes (runs/<dataset>/<pct>/diffusion/unet) or the output "
            "of `python -m diffinject.convert adm CKPT --out DIR`"
        )
    try:
        info = json.loads((folder / INFO_NAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DIFFUSION={path}: {folder / INFO_NAME} is not valid JSON ({error})") from error
    if not isinstance(info, dict):
        raise ValueError(f"DIFFUSION={path}: {folder / INFO_NAME} must hold a JSON object")
    return folder, info


def link_diffusion(root: Path, export: Path) -> None:
    """`{root}/diffusion/unet` → the given export: the report and studies find it where a trained one is."""
    link = root / "diffusion" / "unet"
    if link.is_symlink() and link.resolve() == export:
        return
    if link.exists() and not link.is_symlink():
        raise FileExistsError(
            f"{link} holds a diffusion model trained by this run; DIFFUSION={export} would shadow it. "
            "Use another RUNS root or remove that folder"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    link.symlink_to(export, target_is_directory=True)


def selection_upstream(config: dict[str, Any], seed: int, stages: Sequence[str]) -> list[str]:
    """The bias step a classifier stage waits for when it selects checkpoints with the bias model."""
    selection = (config.get("model") or {}).get("init_args", {}).get("selection_bias")
    return [f"seed{seed}/bias"] if selection else []


def second_view_upstream(config: dict[str, Any], seed: int) -> list[str]:
    """The Vanilla step an inject stage waits for when its gate's premise check reads the Vanilla model."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    reads = any(
        isinstance(c, dict) and (c.get("init_args") or {}).get("second_view_checkpoint") for c in callbacks
    )
    return [f"seed{seed}/vanilla"] if reads else []


def plan(opts: Options) -> list[Step]:
    """Every step in execution order (the report is run separately, after them)."""
    if opts.dataset not in DATASETS:
        raise ValueError(f"DATASET={opts.dataset!r}: expected one of {', '.join(DATASETS)}")
    unknown = sorted(set(opts.stages) - set(ALL_STAGES))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}: expected some of {', '.join(ALL_STAGES)}")
    if len(set(opts.seeds)) != len(opts.seeds):
        raise ValueError(f"--seeds {' '.join(map(str, opts.seeds))}: each seed may appear once")
    if opts.dataset in RATIO_DATASETS:
        pct_to_ratio(opts.pct)
    else:
        path_component(opts.pct, "PCT")
    export, export_info = diffusion_export(opts.diffusion) if opts.diffusion else (None, {})
    root = opts.root
    trainer = ["--trainer", str(Path(opts.configs) / "trainer" / f"{opts.trainer}.yaml")]
    if opts.devices is not None:
        trainer += ["--trainer.devices", str(opts.devices)]
    steps: list[Step] = []

    def fit_test(stage: str, seed: int, upstream: list[str], config: dict[str, Any] | None = None) -> Step:
        folder = root / f"seed{seed}" / stage
        config = stage_config(opts, stage, seed) if config is None else config
        upstream = [*upstream, *selection_upstream(config, seed, opts.stages)]
        cfg = str(folder / CONFIG_NAME)
        common = ["--config", cfg, *trainer, "--seed_everything", str(seed)]
        last = folder / "checkpoints" / "last.ckpt"
        resume = ["--ckpt_path", str(last)] if last.is_file() else []
        best = str(folder / "checkpoints" / "best.ckpt")
        commands = [["fit", *common, *resume], ["test", *common, "--ckpt_path", best]]
        # The biased validation split tends to select an early epoch: test the last epoch too, for reference.
        last_dir = folder / "last_epoch"
        place = ["--trainer.default_root_dir", str(last_dir)]
        place += ["--trainer.logger.init_args.save_dir", str(folder)]
        place += ["--trainer.logger.init_args.name", "last_epoch"]
        commands.append(["test", *common, *place, "--ckpt_path", str(last)])
        return Step(stage, seed, folder, commands, folder / "metrics.json", config, upstream)

    for seed in opts.seeds:
        if "bias" in opts.stages:
            step = fit_test("bias", seed, [])
            topk_config = stage_config(opts, "bias", seed, template="topk")
            topk_cfg = step.folder / "topk" / CONFIG_NAME
            step.commands.append(
                ["predict", "--config", str(topk_cfg), *trainer, "--seed_everything", str(seed)]
            )
            step.config = {"fit": step.config, "topk": topk_config}
            step.artifact = step.folder / "topk.csv"
            steps.append(step)
        for stage in BASELINES:
            if stage in opts.stages:
                steps.append(fit_test(stage, seed, []))
    if "diffusion" in opts.stages and export is None:
        folder = root / "diffusion"
        config = stage_config(opts, "diffusion", None)
        last = folder / "checkpoints" / "last.ckpt"
        resume = ["--ckpt_path", str(last)] if last.is_file() else []
        command = ["fit", "--config", str(folder / CONFIG_NAME), *trainer, "--seed_everything", "0", *resume]
        steps.append(Step("diffusion", None, folder, [command], folder / "unet" / "config.json", config))
    for seed in opts.seeds:
        if "inject" in opts.stages:
            folder = root / f"seed{seed}" / "inject"
            config = stage_config(opts, "inject", seed)
            # Pairing and η = 1 noise follow the run's seed, so seeds differ in their synthetic sets too.
            config["data"].setdefault("init_args", {})["seed"] = seed
            if export is not None:
                config["model"].setdefault("init_args", {})["unet"] = str(export)
                source = (source_data_section(config) or {}).get("init_args", {})
                if "image_size" in source and export_info.get("image_size"):
                    # Pairs at the size the model was trained on (a 256 px FFHQ model gets 256 px faces,
                    # not 224 px ones padded with black).
                    source["image_size"] = int(export_info["image_size"])
            command = [
                "predict",
                "--config",
                str(folder / CONFIG_NAME),
                *trainer,
                "--seed_everything",
                str(seed),
            ]
            upstream = [f"seed{seed}/bias"] + (["diffusion"] if export is None else [])
            upstream += second_view_upstream(config, seed)
            step = Step("inject", seed, folder, [command], folder / "manifest.csv", config, upstream)
            if export is not None:  # a given model: its weights are an input (a changed file rebuilds inject)
                step.inputs = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".bin"))
                step.inputs += [export / "config.json", export / INFO_NAME]
            steps.append(step)
    # Every inject before any debias: a worker waiting on an upstream step holds its slot.
    for seed in opts.seeds:
        if "debias" in opts.stages:
            steps.append(fit_test("debias", seed, [f"seed{seed}/inject"]))
    return steps + generative_steps(opts, trainer, fit_test)


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(
        prog="python -m diffinject.workflow.pipeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--dataset", default="cmnist", choices=DATASETS)
    parser.add_argument(
        "--pct", default="1pct", help="conflicting share folder name: 0.5pct, 1pct, 2pct, 5pct"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--trainer", default="cpu", choices=("cpu", "gpu", "ddp"))
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--data-root", default=None, help="where user-supplied datasets live (default: data)")
    parser.add_argument("--configs", default="configs")
    parser.add_argument(
        "--stages",
        nargs="+",
        default=list(DEFAULT_STAGES),
        choices=ALL_STAGES,
        help=f"default: {' '.join(DEFAULT_STAGES)}",
    )
    parser.add_argument("--variant", action="append", default=[], help="extra per-stage override YAML")
    folder = parser.add_argument_group("DATASET=folder (your own tree; configs/folder/README.md)")
    folder.add_argument("--name", default=None, help="the dataset's folder under --data-root")
    folder.add_argument(
        "--headline",
        default="all",
        choices=HEADLINES,
        help="the report's unbiased accuracy: the whole test set, or its bias-conflicting images only",
    )
    folder.add_argument(
        "--image-size", type=int, default=None, help="square side (default: read from the tree)"
    )
    folder.add_argument(
        "--channels", type=int, default=None, choices=(1, 3), help="default: read from the tree"
    )
    folder.add_argument("--num-classes", type=int, default=None, help="default: max label + 1")
    folder.add_argument("--num-bias-classes", type=int, default=None, help="default: max bias + 1")
    parser.add_argument(
        "--diffusion",
        default=None,
        help="use this diffusion export (unet/ folder of a diffusion stage, or a converted pretrained model) "
        "instead of training the diffusion stage",
    )
    parser.add_argument("--no-report", action="store_true", help="stop after the stages")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=os.environ.get("DIFFINJECT_VERBOSE", "") not in ("", "0"),
        help="all stage output on the terminal too (make: VERBOSE=1): as it comes with one job, line by line "
        "after the stage's name with several. Default: it goes whole to the stage folder's pipeline.log; the "
        "terminal gets one line per stage, a heartbeat with the stage's progress about once a minute, and "
        "warnings",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="steps run at once (default: 2 on CPU, where each process uses one thread; 1 on GPU). With more "
        "than one, --verbose prints stage output line by line, after the stage's name.",
    )
    args = parser.parse_args(argv)
    opts = Options(
        dataset=args.dataset,
        pct=args.pct,
        seeds=args.seeds,
        runs=args.runs,
        profile=args.profile,
        trainer=args.trainer,
        devices=args.devices,
        data_root=args.data_root,
        configs=args.configs,
        stages=args.stages,
        variants=args.variant,
        report=not args.no_report,
        name=args.name,
        headline=args.headline,
        image_size=args.image_size,
        channels=args.channels,
        num_classes=args.num_classes,
        num_bias_classes=args.num_bias_classes,
        diffusion=args.diffusion,
    )
    if args.dataset != "folder" and args.name is not None:
        parser.error(f"--name is for --dataset folder (got --dataset {args.dataset})")
    return opts, args


def main(argv: Sequence[str] | None = None) -> None:
    """Plan, check, run, report. Exit code 2: a problem found before any stage started (no traceback), or
    another pipeline holds the run root (`workflow.lock`); 1: a stage failed (one-screen summary)."""
    with contextlib.ExitStack() as held:  # the run root's lock, taken once the checks pass
        _main(argv, held)


def _main(argv: Sequence[str] | None, held: contextlib.ExitStack) -> None:
    opts, args = parse_args(argv)
    quiet_known_noise()  # the report loads the UNet in this process (diffusers' accelerate hint)
    started = time.perf_counter()
    try:
        steps = plan(opts)
        check_dataset(opts)
        check_handovers(steps, opts.root)
        if not args.dry_run:  # a dry run writes nothing: it needs no lock
            command = ["python", "-m", "diffinject.workflow.pipeline"]
            command += sys.argv[1:] if argv is None else argv
            held.enter_context(pipeline_lock(opts.root, command))
            steps = plan(opts)  # again, under the lock: a run that just ended may have left checkpoints
    except (CannotStart, LockHeld, FileNotFoundError, ValueError) as error:
        print(f"[pipeline] cannot start: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if opts.dataset == "folder":
        print(f"[pipeline] folder dataset {opts.facts.summary()}", flush=True)
        if not args.dry_run:
            opts.root.mkdir(parents=True, exist_ok=True)
            (opts.root / "dataset.json").write_text(opts.facts.to_json())
    if opts.diffusion and not args.dry_run:
        export = Path(opts.diffusion).expanduser().resolve()  # checked by plan()
        link_diffusion(opts.root, export)
        print(f"[pipeline] diffusion: the given export {export} (not trained)", flush=True)
    jobs = (
        args.jobs if args.jobs is not None else (min(2, os.cpu_count() or 1) if opts.trainer == "cpu" else 1)
    )
    if jobs > 1 and opts.trainer == "cpu":
        # The diffusion model is the long pole: it trains first, alone, on every core the jobs would use.
        for step in steps:
            if step.stage == "diffusion":
                step.exclusive, step.threads = True, jobs
    elif jobs > 1:
        steps.sort(key=lambda step: step.stage != "diffusion")
    runner = Runner(steps, opts.root / "timings.json", dry_run=args.dry_run, jobs=jobs, root=opts.root)
    runner.verbose = args.verbose
    try:
        timings = runner.run()
    except StepFailed:
        print(failure_summary(runner), file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    if opts.report and not args.dry_run:
        from diffinject.report import write_report

        write_report(opts.root, seeds=opts.seeds, timings=timings)
    print(f"[pipeline] total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
