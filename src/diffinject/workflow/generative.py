"""The generative baselines' steps (issue 22): A² and AmpliBias, their two controls, for any dataset.

Per selected row (`a2`, `a2_nocdc`, `amplibias`, `topk_oversample`) the generator stages of
`configs.GENERATOR_CHAIN` run first — A²'s source GAN once per (dataset, pct) under `{root}/a2_source/`, the
rest per seed — then a classifier stage named after the row, trained on original ∪ the generator's images.

Configs: a dataset's own `configs/<dataset>/<stage>.yaml` when it has one (CMNIST does); otherwise the CMNIST
recipe with the dataset's data section and image size taken from its bias stage (the GANs read images only, so
the same recipe serves every dataset; `model_size` 32 up to 32 px, 64 above, where images are resized).
The control `a2_nocdc` is A² with `consistency_weight: 0` in its own folders. The classifier stages are the
dataset's debias template (same architecture, epochs and label-free checkpoint selection as every other row)
with `DebiasClassifier` and GCE, as A²'s official retraining, on the generator's `manifest.csv`;
`topk_oversample` serves AmpliBias's slots as their nearest top-K image (`synthetic_control: content_copy`).
Variant files may override each of these stages by its name.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from diffinject.data.sections import source_data_section
from diffinject.workflow.configs import (
    GAN_ROWS,
    GENERATOR_CHAIN,
    SHARED_GENERATORS,
    Options,
    deep_merge,
    load_variant,
    load_yaml,
    path_mover,
    profile_section,
    relocate,
    set_data_args,
    stage_config,
)
from diffinject.workflow.runner import CONFIG_NAME, Step

#: the dataset whose generator recipes the others borrow (their data and sizes filled in)
RECIPE_DATASET = "cmnist"
#: a control stage → (the recipe it copies, the overrides that make it the control)
CONTROL_OF: dict[str, tuple[str, dict[str, Any]]] = {
    "a2_nocdc_adapt": ("a2_adapt", {"model": {"init_args": {"consistency_weight": 0.0}}}),
    "a2_nocdc_translate": ("a2_translate", {}),
}
#: the classifier row → (the generator stage whose manifest it trains on, its synthetic_control)
ROW_DATA: dict[str, tuple[str, str | None]] = {
    "a2": ("a2_translate", None),
    "a2_nocdc": ("a2_nocdc_translate", None),
    "amplibias": ("amplibias_generate", None),
    "topk_oversample": ("amplibias_generate", "content_copy"),
}
#: the debias template's model arguments a `DebiasClassifier` takes as they are
CLASSIFIER_ARGS = (
    "arch", "num_classes", "in_channels", "image_size", "pretrained", "lr", "weight_decay",
    "num_bias_classes", "selection_bias", "selection_min_group", "selection_margin_se", "q",
)  # fmt: skip
#: what a fit stage exports (the step's artifact) and what a predict stage writes
EXPORT_INFO = Path("generator") / "gan_info.json"
MANIFEST = "manifest.csv"
FIT_STAGES = ("a2_source", "a2_adapt", "a2_nocdc_adapt", "amplibias_gan")
#: each generator stage's upstream stages (per seed unless shared)
UPSTREAM: dict[str, tuple[str, ...]] = {
    "a2_source": (),
    "a2_adapt": ("a2_source", "bias"),
    "a2_translate": ("a2_source", "a2_adapt", "bias"),
    "a2_nocdc_adapt": ("a2_source", "bias"),
    "a2_nocdc_translate": ("a2_source", "a2_nocdc_adapt", "bias"),
    "amplibias_gan": ("bias",),
    "amplibias_generate": ("amplibias_gan", "bias"),
}


def _rename_folder(config: dict[str, Any], parent: Path, old: str, new: str) -> dict[str, Any]:
    """Move the stage folder `{parent}/{old}` (every path under it, and the logger's name) to `.../{new}`.

    Only paths under the run's own folders move: a data root that happens to contain `old` stays as it is."""
    before, after = (parent / old).as_posix(), (parent / new).as_posix()

    def replace(value: str) -> str:
        if value == before or value.startswith(before + "/"):
            return after + value[len(before) :]
        return value

    config = relocate(config, replace)
    logger = ((config.get("trainer") or {}).get("logger") or {}).get("init_args")
    if isinstance(logger, dict) and logger.get("name") == old:
        logger["name"] = new
    return config


def borrowed_recipe(opts: Options, recipe: str, seed: int | None) -> dict[str, Any]:
    """The CMNIST generator recipe with this dataset's data (from its bias stage) and image geometry."""
    config = load_yaml(Path(opts.configs) / RECIPE_DATASET / f"{recipe}.yaml")
    config = deep_merge(config, profile_section(opts, recipe))
    for variant in opts.variants:
        config = deep_merge(config, load_variant(Path(variant)).get(recipe))
    config = relocate(config, path_mover(RECIPE_DATASET, opts.root, seed))
    bias = stage_config(dataclasses.replace(opts, variants=[]), "bias", seed if seed is not None else 0)
    data, model = source_data_section(bias), (bias.get("model") or {}).get("init_args") or {}
    source = source_data_section(config)
    if data is None or source is None:
        raise ValueError(f"{recipe}: no data section to fill from the {opts.dataset} bias stage's config")
    batch = (source.get("init_args") or {}).get("batch_size")
    source.clear()
    source.update(copy.deepcopy(data))
    if batch is not None:
        source.setdefault("init_args", {})["batch_size"] = batch
    size, channels = model.get("image_size"), model.get("in_channels")
    init = (config.get("model") or {}).get("init_args") or {}
    if size is not None and "image_size" in init:
        init["image_size"] = int(size)
        if "model_size" in init:
            init["model_size"] = 32 if int(size) <= 32 else 64
    if channels is not None and "channels" in init:
        init["channels"] = int(channels)
    return config


def generator_config(opts: Options, stage: str, seed: int | None) -> dict[str, Any]:
    """The resolved config of one generator stage (own template or the borrowed recipe; a control's overrides;
    variant sections under the stage's own name; the seed for the stages that draw)."""
    recipe, overrides = CONTROL_OF.get(stage, (stage, {}))
    if (opts.config_dir / f"{recipe}.yaml").is_file():
        config = stage_config(opts, recipe, seed, template=recipe)
    else:
        config = borrowed_recipe(opts, recipe, seed)
    if stage != recipe:
        parent = opts.root / f"seed{seed}" if seed is not None else opts.root
        config = _rename_folder(config, parent, recipe, stage)
        # the control's translation renders with the control's adapted generator
        config = _rename_folder(config, parent, "a2_adapt", "a2_nocdc_adapt")
        config = deep_merge(config, overrides)
        for variant in opts.variants:
            config = deep_merge(config, load_variant(Path(variant)).get(stage))
    data = (config.get("data") or {}).get("init_args")
    if seed is not None and isinstance(data, dict) and "seed" in data:
        data["seed"] = seed  # which images are translated / which noise is drawn follows the run's seed
    set_data_args(config, opts.dataset, opts.pct, opts.data_root)
    return config


def classifier_config(opts: Options, row: str, seed: int) -> dict[str, Any]:
    """The row's classifier: the debias template (without the run's debias variants) as `DebiasClassifier`
    with GCE on the generator's manifest; then the variants' sections under the row's name."""
    config = stage_config(dataclasses.replace(opts, variants=[]), "debias", seed)
    config = _rename_folder(config, opts.root / f"seed{seed}", "debias", row)
    init = (config.get("model") or {}).get("init_args") or {}
    kept = {key: value for key, value in init.items() if key in CLASSIFIER_ARGS}
    config["model"] = {"class_path": "DebiasClassifier", "init_args": {**kept, "loss": "gce"}}
    stage, control = ROW_DATA[row]
    data = source_data_section(config)
    if data is None:
        raise ValueError(f"{row}: the {opts.dataset} debias template has no data section")
    data_init = data.setdefault("init_args", {})
    data_init["synthetic_manifest"] = str((opts.root / f"seed{seed}" / stage / MANIFEST).as_posix())
    data_init.pop("synthetic_control", None)
    if control is not None:
        data_init["synthetic_control"] = control
    for variant in opts.variants:
        config = deep_merge(config, row_section(load_variant(Path(variant)).get(row), kept))
    return config


def row_section(section: dict[str, Any] | None, kept: dict[str, Any]) -> dict[str, Any] | None:
    """A variant's section for a row. One that swaps the retraining class (e.g. `class_path: LfFClassifier`,
    DiffInject's own retraining, to compare generators under one recipe) keeps the row's shared arguments —
    sizes, lr, this seed's selection model — under its own init args, so it need not spell out seed paths."""
    model = (section or {}).get("model")
    if not isinstance(model, dict) or model.get("class_path") in (None, "DebiasClassifier"):
        return section
    init = {**kept, **(model.get("init_args") or {})}
    return {**section, "model": {"class_path": model["class_path"], "init_args": init}}


def chain_of(stages: list[str]) -> list[str]:
    """The generator stages the selected rows need, each once, in order."""
    needed: list[str] = []
    for row in GAN_ROWS:
        if row in stages:
            needed += [s for s in GENERATOR_CHAIN[row] if s not in needed]
    return needed


def generative_steps(
    opts: Options, trainer: list[str], fit_test: Callable[[str, int, list[str], dict[str, Any]], Step]
) -> list[Step]:
    """Every step of the selected generative rows: the shared source GAN, per-seed generators, classifiers."""
    steps: list[Step] = []
    needed = chain_of(list(opts.stages))

    def folder_of(stage: str, seed: int | None) -> Path:
        return opts.root / stage if seed is None else opts.root / f"seed{seed}" / stage

    def linked(stage: str, seed: int | None) -> bool:
        """A generator folder `make study` linked from its base run: used as it is, never rebuilt here."""
        return folder_of(stage, seed).is_symlink()

    def generator_step(stage: str, seed: int | None) -> Step:
        folder = folder_of(stage, seed)
        config = generator_config(opts, stage, seed)
        command = ["--config", str(folder / CONFIG_NAME), *trainer, "--seed_everything", str(seed or 0)]
        if stage in FIT_STAGES:
            last = folder / "checkpoints" / "last.ckpt"
            command = ["fit", *command, *(["--ckpt_path", str(last)] if last.is_file() else [])]
            artifact = folder / EXPORT_INFO
        else:
            command, artifact = ["predict", *command], folder / MANIFEST
        upstream = [u if u in SHARED_GENERATORS else f"seed{seed}/{u}" for u in UPSTREAM[stage]]
        return Step(stage, seed, folder, [command], artifact, config, upstream)

    steps += [generator_step(s, None) for s in needed if s in SHARED_GENERATORS and not linked(s, None)]
    # A worker waiting on an upstream step holds its slot: what does not wait for the shared GAN goes first.
    waits = {stage: any(u in SHARED_GENERATORS for u in UPSTREAM[stage]) for stage in needed}
    for later in (False, True):
        for seed in opts.seeds:
            own = [s for s in needed if s not in SHARED_GENERATORS and waits[s] == later]
            steps += [generator_step(stage, seed) for stage in own if not linked(stage, seed)]
    for seed in opts.seeds:
        for row in GAN_ROWS:
            if row in opts.stages:
                upstream = [f"seed{seed}/{ROW_DATA[row][0]}"]
                steps.append(fit_test(row, seed, upstream, classifier_config(opts, row, seed)))
    return steps
