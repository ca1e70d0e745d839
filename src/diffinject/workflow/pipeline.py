"""`make pipeline`: every DiffInject stage through the `diffinject` CLI, resumable, one line per stage.

Order: bias fit → top-K predict → baselines (vanilla, LfF) → diffusion fit → inject predict →
debias fit/test → report. A classifier stage whose config sets `selection_bias` (checkpoint selection with
the bias model) waits for its seed's bias stage and is rebuilt when that changes. Per seed: vanilla, lff,
bias (+ top-K), inject, debias under `{runs}/{dataset}/{pct}/seed{S}/`; the diffusion model is trained
once per (dataset, pct) under `{runs}/{dataset}/{pct}/diffusion/` (it uses no labels and is by far the
most expensive stage).

Each stage's config is built from `configs/{dataset}/{stage}.yaml`, deep-merged with the profile's
section (`configs/{dataset}/profiles/{profile}.yaml`, keyed by stage) and any `--variant` file (same
shape), with every `runs/{dataset}/{pct}` path moved under the run root. The resolved YAML is written into
the stage folder as `pipeline_config.yaml` and is what the CLI runs, so each run folder says exactly how it
was produced.

A stage is skipped when its artifact exists and its stored config equals the resolved one. When the config
changed, or a stage upstream of it was rebuilt in this invocation, its folder is cleared and it is rebuilt.
An interrupted stage (no artifact yet) resumes: fits continue from `checkpoints/last.ckpt`, the injection
writer skips the images already written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffinject.data.inspect import FolderFacts, inspect_folder
from diffinject.workflow.folder import HEADLINES, fill_config, template_set
from diffinject.workflow.runner import CONFIG_NAME, Step, run_steps

DATASETS = ("cmnist", "ccifar10", "bffhq", "dogscats", "folder")
PROFILES = ("smoke", "quick", "paper")
PER_SEED_STAGES = ("vanilla", "lff", "bias", "inject", "debias")
ALL_STAGES = ("vanilla", "lff", "bias", "diffusion", "inject", "debias")
#: data modules whose imbalance is a `ratio`; the folder datasets take a `pct` folder name instead.
RATIO_DATASETS = ("cmnist", "ccifar10")


def pct_to_ratio(pct: str) -> float:
    """'1pct' → 0.01, '0.5pct' → 0.005 (clear error for anything else)."""
    if not pct.endswith("pct"):
        raise ValueError(f"PCT={pct!r}: expected a folder name like 0.5pct, 1pct, 2pct, 5pct")
    try:
        value = float(pct[:-3]) / 100
    except ValueError as error:
        raise ValueError(f"PCT={pct!r}: expected a number before 'pct', e.g. 1pct") from error
    if not 0 < value < 1:
        raise ValueError(f"PCT={pct!r}: the conflicting share must lie in (0, 100) percent")
    return value


def path_component(value: str, what: str) -> str:
    """A folder name that stays one level deep (no separators, `..`, or hidden/empty names)."""
    if not value or value in (".", "..") or value.startswith(".") or "/" in value or "\\" in value:
        raise ValueError(f"{what}={value!r}: expected a plain folder name (no '/', '..' or leading '.')")
    return value


def deep_merge(base: dict[str, Any], override: dict[str, Any] | None) -> dict[str, Any]:
    """`override` into a copy of `base`; dicts merge key by key, anything else (lists too) is replaced.

    A section naming another `class_path` replaces the base section whole: the other class's init args
    would not fit (e.g. a variant training the debiased model with `LfFClassifier`).
    """
    if "class_path" in (override or {}) and override.get("class_path") != base.get("class_path"):
        return copy.deepcopy(override)
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def relocate(node: Any, replace: Callable[[str], str]) -> Any:
    """Apply `replace` to every string in a nested YAML structure."""
    if isinstance(node, dict):
        return {key: relocate(value, replace) for key, value in node.items()}
    if isinstance(node, list):
        return [relocate(value, replace) for value in node]
    return replace(node) if isinstance(node, str) else node


def path_mover(dataset: str, root: Path, seed: int | None) -> Callable[[str], str]:
    """Move `runs/{dataset}/{any pct}[/...]` paths of a template config under this run's root.

    Stage folders (and the bare root, which loggers use as `save_dir`) of per-seed stages go to `seed{S}/`;
    the shared diffusion folder stays at the root.
    """
    seeded = root / f"seed{seed}" if seed is not None else root

    prefix = f"runs/{dataset}/"

    def replace(value: str) -> str:
        if not value.startswith(prefix):
            return value
        rest = value[len(prefix) :].partition("/")[2]  # drop the template's pct folder
        first = rest.split("/", 1)[0]
        if first in PER_SEED_STAGES:
            return str((root / f"seed{seed if seed is not None else 0}" / rest).as_posix())
        if first == "diffusion":
            return str((root / rest).as_posix())
        return str((seeded / rest).as_posix()) if rest else str(seeded.as_posix())

    return replace


def set_data_args(config: dict[str, Any], dataset: str, pct: str, data_root: str | None) -> None:
    """Point the config's data module (or the one nested in the injection pairs module) at this split/root."""
    section = config.get("data")
    while isinstance(section, dict):
        init = section.setdefault("init_args", {})
        if isinstance(init.get("data"), dict):  # InjectionPairsDataModule wraps the source data module
            section = init["data"]
            continue
        if dataset in RATIO_DATASETS:
            init["ratio"] = pct_to_ratio(pct)
        else:
            init["pct"] = pct
        if data_root is not None:
            init["root"] = data_root
        section = None


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config {path} not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


@dataclass
class Options:
    dataset: str = "cmnist"
    pct: str = "1pct"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    runs: str = "runs"
    profile: str = "quick"
    trainer: str = "cpu"
    devices: int | None = None
    data_root: str | None = None
    configs: str = "configs"
    stages: list[str] = field(default_factory=lambda: list(ALL_STAGES))
    variants: list[str] = field(default_factory=list)
    report: bool = True
    #: DATASET=folder: the dataset's folder name under data_root, the headline test subset and overrides of
    #: what is read from the tree (None: read it).
    name: str | None = None
    headline: str = "all"
    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    num_bias_classes: int | None = None
    #: a diffusion export to use instead of training the diffusion stage (DIFFUSION=<dir>).
    diffusion: str | None = None
    _facts: FolderFacts | None = field(default=None, repr=False, compare=False)

    @property
    def root(self) -> Path:
        if self.dataset == "folder":
            return Path(self.runs) / "folder" / self.folder_name / self.pct
        return Path(self.runs) / self.dataset / self.pct

    @property
    def folder_name(self) -> str:
        if not self.name:
            raise ValueError("DATASET=folder needs NAME=<the dataset's folder under DATA_ROOT> (--name)")
        return path_component(self.name, "NAME")

    @property
    def facts(self) -> FolderFacts:
        """The folder dataset read from its tree (once; errors name the path and the rule)."""
        if self._facts is None:
            self._facts = inspect_folder(
                self.data_root or "data",
                self.folder_name,
                self.pct,
                image_size=self.image_size,
                channels=self.channels,
                num_classes=self.num_classes,
                num_bias_classes=self.num_bias_classes,
            )
        return self._facts

    @property
    def config_dir(self) -> Path:
        """Where this dataset's stage templates live (folder data: the template set for the image size)."""
        if self.dataset == "folder":
            return Path(self.configs) / "folder" / template_set(self.facts.image_size)
        return Path(self.configs) / self.dataset


def stage_config(opts: Options, stage: str, seed: int | None, template: str | None = None) -> dict[str, Any]:
    """The resolved config dict of one stage (template → profile → variants → paths → data)."""
    configs = opts.config_dir
    name = template or stage
    profile_file = configs / "profiles" / f"{opts.profile}.yaml"
    if not profile_file.is_file():  # dataset-agnostic profile
        profile_file = Path(opts.configs) / "profiles" / f"{opts.profile}.yaml"
    section: dict[str, Any] = {}
    if profile_file.is_file():
        section = dict(load_yaml(profile_file).get(name) or {})
    # A profile may swap the base file of a stage (e.g. the paper-size diffusion config) with `_template`,
    # a file name in configs/<dataset>/
    base = configs / (section.pop("_template") if "_template" in section else f"{name}.yaml")
    config = load_yaml(base)
    if opts.dataset == "folder":
        config = fill_config(config, name if name != "topk" else "bias", opts.facts, opts.headline)
    config = deep_merge(config, section)
    if not profile_file.is_file() and opts.profile != "quick":
        raise FileNotFoundError(
            f"profile {opts.profile!r}: neither {configs / 'profiles'} nor {profile_file.parent} has "
            f"{opts.profile}.yaml (profiles: {', '.join(PROFILES)})"
        )
    for variant in opts.variants:
        config = deep_merge(config, load_yaml(Path(variant)).get(name))
    config = relocate(config, path_mover(opts.dataset, opts.root, seed))
    set_data_args(config, opts.dataset, opts.pct, opts.data_root)
    return config


def diffusion_export(path: str) -> tuple[Path, dict[str, Any]]:
    """A given diffusion export (DIFFUSION=<dir>), checked before any stage starts: absolute path, info."""
    from diffinject.nets.unet import INFO_FILENAME  # here: the pipeline itself needs no diffusers import

    folder = Path(path).expanduser().resolve()
    missing = [name for name in ("config.json", INFO_FILENAME) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"DIFFUSION={path}: {folder} is not a diffusion export (missing {', '.join(missing)}); expected "
            "the unet/ folder a diffusion stage writes (runs/<dataset>/<pct>/diffusion/unet) or the output "
            "of `python -m diffinject.convert adm CKPT --out DIR`"
        )
    try:
        info = json.loads((folder / INFO_FILENAME).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"DIFFUSION={path}: {folder / INFO_FILENAME} is not valid JSON ({error})") from error
    if not isinstance(info, dict):
        raise ValueError(f"DIFFUSION={path}: {folder / INFO_FILENAME} must hold a JSON object")
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
    return [f"seed{seed}/bias"] if selection and "bias" in stages else []


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

    def fit_test(stage: str, seed: int, upstream: list[str]) -> Step:
        folder = root / f"seed{seed}" / stage
        config = stage_config(opts, stage, seed)
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
        for stage in ("vanilla", "lff"):
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
                source = config["data"]["init_args"].get("data", {}).get("init_args", {})
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
            steps.append(Step("inject", seed, folder, [command], folder / "manifest.csv", config, upstream))
    # Every inject before any debias: a worker waiting on an upstream step holds its slot.
    for seed in opts.seeds:
        if "debias" in opts.stages:
            steps.append(fit_test("debias", seed, [f"seed{seed}/inject"]))
    return steps


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
    parser.add_argument("--stages", nargs="+", default=list(ALL_STAGES), choices=ALL_STAGES)
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
        "--jobs",
        type=int,
        default=None,
        help="steps run at once (default: 2 on CPU, where each process uses one thread; 1 on GPU). With more "
        "than one, each step's output goes to its folder's pipeline.log and one line per stage is printed.",
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
    opts, args = parse_args(argv)
    started = time.perf_counter()
    steps = plan(opts)
    if opts.dataset == "folder":
        print(f"[pipeline] folder dataset {opts.facts.summary()}", flush=True)
        if not args.dry_run:
            opts.root.mkdir(parents=True, exist_ok=True)
            (opts.root / "dataset.json").write_text(opts.facts.to_json())
    if opts.diffusion and not args.dry_run:
        export = diffusion_export(opts.diffusion)[0]
        link_diffusion(opts.root, export)
        print(f"[pipeline] diffusion: the given export {export} (not trained)", flush=True)
    jobs = (
        args.jobs if args.jobs is not None else (min(2, os.cpu_count() or 1) if opts.trainer == "cpu" else 1)
    )
    if jobs > 1:  # the diffusion model is the long pole: start it first, beside the classifiers
        steps.sort(key=lambda step: step.stage != "diffusion")
    timings = run_steps(steps, opts.root / "timings.json", dry_run=args.dry_run, jobs=jobs)
    if opts.report and not args.dry_run:
        from diffinject.report import write_report

        write_report(opts.root, seeds=opts.seeds, timings=timings)
    print(f"[pipeline] total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
