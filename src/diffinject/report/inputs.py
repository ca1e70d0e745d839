"""What the report reads: per-seed metrics and top-K summaries, wall times, the configs each stage ran.

Every reader fails with an error naming the file, except a seed's `metrics.json`: an unreadable one (not
UTF-8, not JSON, wrong content) only drops that seed, with a warning naming the file, and the table says which
seed is missing; one bad copy must not take every other result down with it. Config files:
`pipeline_config.yaml` (what `make pipeline` resolved and ran) or, for runs made without the pipeline,
Lightning's own `config.yaml` in the stage folder.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from diffinject.measures.metrics import selection_monitor
from diffinject.report.groups import collect_groups

#: (stage folder, name in the report); the last row is the biased reference, not a competing method.
METHODS = (
    ("vanilla", "Vanilla"),
    ("lff", "LfF"),
    ("disent", "DisEnt"),
    ("lff_be", "LfF+BE"),
    ("disent_be", "DisEnt+BE"),
    ("a2", "A²"),
    ("a2_nocdc", "A² without the consistency term (control)"),
    ("amplibias", "AmpliBias"),
    ("topk_oversample", "top-K oversampling (control)"),
    ("debias", "DiffInject"),
    ("bias", "GCE bias (reference)"),
)
COMPARED = (
    "vanilla", "lff", "disent", "lff_be", "disent_be", "a2", "a2_nocdc", "amplibias", "topk_oversample",
    "debias",
)  # fmt: skip
#: what `make baselines` runs (the Makefile's `--stages`): the table's note says which of them it would add
BASELINE_STAGES = (
    "vanilla", "lff", "disent", "lff_be", "disent_be", "a2", "a2_nocdc", "amplibias", "topk_oversample",
    "bias",
)  # fmt: skip
#: the generator stages whose images a row trains on (the report measures them as it does the inject stage's)
GENERATED_SETS = (
    ("a2_translate", "A²"),
    ("a2_nocdc_translate", "A², no consistency"),
    ("amplibias_generate", "AmpliBias"),
)
#: per-seed stage folders whose configs the report lists, and the order of the knob table
SEED_STAGES = (
    "vanilla", "lff", "disent", "lff_be", "disent_be", "bias", "inject", "debias", "a2_adapt", "a2_translate",
    "a2", "amplibias_gan", "amplibias_generate", "amplibias",
)  # fmt: skip
KNOB_ORDER = (
    "vanilla", "lff", "disent", "lff_be", "disent_be", "bias", "topk", "diffusion", "inject", "debias",
    "a2_source", "a2_adapt", "a2_translate", "a2", "amplibias_gan", "amplibias_generate", "amplibias",
)  # fmt: skip
#: the table's accuracy columns. Worst-group is not among them: with many small (class, bias) test groups
#: (Colored MNIST at 1 %: 100 groups of ~10 images) some group is at 0 % for every method, so it tells nothing
#: apart; the worst class on the conflicting images pools a class's groups instead.
COLUMNS = (
    ("test/acc", "overall"),
    ("test/acc_aligned", "aligned"),
    ("test/acc_conflicting", "conflicting"),
    ("test/acc_conflicting_worst_class", "worst class (conflicting)"),
)
#: a last column only when every non-empty (class, bias) test group is large (`groups.worst_group_rule`)
WORST_GROUP = ("test/acc_worst_group", "worst-group")
EXTRA_KEYS = ("test/acc_worst_group", "test/acc_group_mean", "val/acc")

CONFIG_NAMES = ("pipeline_config.yaml", "config.yaml")
#: (section, init-arg or trainer key) per stage, in the order the report lists them
KEY_KNOBS: dict[str, tuple[tuple[str, str], ...]] = {
    "vanilla": (("model", "arch"), ("model", "lr"), ("trainer", "max_epochs")),
    "lff": (
        ("model", "arch"),
        ("model", "lr"),
        ("model", "q"),
        ("model", "alpha"),
        ("trainer", "max_epochs"),
    ),
    "disent": (
        ("model", "arch"),
        ("model", "lr"),
        ("model", "swap_start"),
        ("model", "lambda_swap"),
        ("model", "lambda_dis_align"),
        ("model", "lambda_swap_align"),
        ("model", "lr_decay_step"),
        ("model", "lr_gamma"),
        ("trainer", "max_epochs"),
    ),
    "bias": (("model", "arch"), ("model", "lr"), ("model", "q"), ("trainer", "max_epochs")),
    "topk": (("topk", "k"), ("topk", "per_class"), ("topk", "k_source")),
    "diffusion": (
        ("model", "unet_preset"),
        ("trainer", "max_steps"),
        ("model", "p2_gamma"),
        ("model", "p2_k"),
        ("model", "lr"),
    ),
    "inject": (
        ("model", "gamma"),
        ("model", "t_edit"),
        ("model", "t_boost"),
        ("model", "steps"),
        ("data", "ratio"),
        ("data", "k"),
        ("data", "k_source"),
        ("data", "style_pool"),
        ("data", "label_from"),
        ("model", "mask_box"),
    ),
    "debias": (
        ("model", "loss"),
        ("model", "q"),
        ("model", "lr"),
        ("trainer", "max_epochs"),
        ("data", "synthetic_control"),
    ),
}
KEY_KNOBS.update(
    {
        "a2_source": (("trainer", "max_steps"), ("model", "model_size"), ("model", "width"), ("model", "lr")),
        "a2_adapt": (("trainer", "max_steps"), ("model", "consistency_weight"), ("model", "lr")),
        "a2_translate": (("model", "inversion_steps"), ("data", "ratio"), ("data", "min_confidence")),
        "amplibias_gan": (
            ("trainer", "max_steps"),
            ("model", "model_size"),
            ("model", "lr"),
            ("model", "policy"),
        ),  # fmt: skip
        "amplibias_generate": (("model", "label_space"), ("data", "ratio")),
        "a2": (("model", "loss"), ("model", "lr"), ("trainer", "max_epochs")),
        "amplibias": (("model", "loss"), ("model", "lr"), ("trainer", "max_epochs")),
    }
)
KEY_KNOBS["lff_be"] = (*KEY_KNOBS["lff"], ("model", "bias_ensemble"))
KEY_KNOBS["disent_be"] = (*KEY_KNOBS["disent"], ("model", "bias_ensemble"))
#: stage → sections whose every other scalar init arg is listed too (variants add their options there)
ALL_ARGS: dict[str, tuple[str, ...]] = {"inject": ("model", "data"), "debias": ("model",)}
IGNORED_ARGS = ("seed", "num_workers", "batch_size", "autocast", "autocast_inversion", "channels_last")


def mean_std(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; 0 for a single value) of the non-missing values."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not clean:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(clean) / len(clean)
    var = sum((v - mean) ** 2 for v in clean) / (len(clean) - 1) if len(clean) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(clean), "values": list(values)}


def read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); rerun the stage that writes it") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the stage that writes it") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded


def stage_config_path(folder: Path) -> Path | None:
    return next((folder / n for n in CONFIG_NAMES if (folder / n).is_file()), None)


def parse_step_key(key: str) -> tuple[int | None, str]:
    """'seed0/bias' or 'seed0/bias/fit' → (0, 'bias'); 'diffusion' → (None, 'diffusion')."""
    parts = key.split("/")
    if parts[0].startswith("seed") and parts[0][4:].isdigit() and len(parts) > 1:
        return int(parts[0][4:]), parts[1]
    return None, parts[0]


def collect_timings(root: Path, seeds: Sequence[int], timings: dict[str, float] | None) -> dict[str, Any]:
    """Wall seconds per stage (summed over the requested seeds and sub-steps) and in total."""
    path = root / "timings.json"
    raw = dict(timings) if timings is not None else (read_json(path) if path.is_file() else {})
    per_stage: dict[str, dict[str, Any]] = {}
    for key, seconds in sorted(raw.items()):
        if not isinstance(seconds, int | float):
            raise ValueError(f"{path}: {key!r} must be a number of seconds, got {seconds!r}")
        seed, stage = parse_step_key(key)
        if seed is not None and seed not in seeds:
            continue
        entry = per_stage.setdefault(stage, {"total_s": 0.0, "per_seed": {}})
        entry["total_s"] += float(seconds)
        if seed is not None:
            entry["per_seed"][f"seed{seed}"] = entry["per_seed"].get(f"seed{seed}", 0.0) + float(seconds)
    return {
        "per_stage": per_stage,
        "total_s": sum(e["total_s"] for e in per_stage.values()),
        "steps": raw,
    }


def _short(class_path: Any) -> Any:
    return class_path.rpartition(".")[2] if isinstance(class_path, str) else class_path


def _is_knob(value: Any) -> bool:
    if isinstance(value, dict):  # e.g. bias_ensemble options
        return all(_is_knob(v) for v in value.values())
    if isinstance(value, str):
        return "/" not in value  # paths are not knobs; the config file is listed anyway
    if isinstance(value, list):
        return all(isinstance(v, int | float) for v in value)
    return value is None or isinstance(value, bool | int | float)


def knobs_of(stage: str, config: dict[str, Any]) -> dict[str, Any]:
    """The key settings of one stage config (class name first), plus any other scalar init arg for
    inject/debias so variant options show up without a code change."""
    sections = {
        "model": (config.get("model") or {}).get("init_args") or {},
        "data": (config.get("data") or {}).get("init_args") or {},
        "trainer": config.get("trainer") or {},
        "topk": {},
    }
    for callback in sections["trainer"].get("callbacks") or []:
        if isinstance(callback, dict) and _short(callback.get("class_path")) == "TopKWriter":
            sections["topk"] = callback.get("init_args") or {}
    knobs: dict[str, Any] = {"class": _short((config.get("model") or {}).get("class_path"))}
    for section, key in KEY_KNOBS.get(stage, ()):
        if key in sections[section]:
            knobs[key] = sections[section][key]
    for section in ALL_ARGS.get(stage, ()):
        for key, value in sections[section].items():
            if key not in knobs and key not in IGNORED_ARGS and _is_knob(value):
                knobs[key] = value
    return knobs


def _differing_keys(knob_sets: Sequence[dict[str, Any]]) -> list[str]:
    first = knob_sets[0]
    keys = {key for other in knob_sets[1:] for key in set(first) | set(other)}
    return sorted(key for key in keys if any(first.get(key) != other.get(key) for other in knob_sets[1:]))


def collect_configs(root: Path, seeds: Sequence[int]) -> dict[str, Any]:
    """Every config file of the run and each stage's key knobs (from the first seed; differences flagged)."""
    folders: dict[str, list[Path]] = {"diffusion": [root / "diffusion"], "a2_source": [root / "a2_source"]}
    for stage in SEED_STAGES:
        folders[stage] = [root / f"seed{s}" / stage for s in seeds]
    folders["topk"] = [root / f"seed{s}" / "bias" / "topk" for s in seeds]
    files: list[str] = []
    knobs: dict[str, dict[str, Any]] = {}
    for stage in KNOB_ORDER:
        per_folder = []
        for folder in folders[stage]:
            path = stage_config_path(folder)
            if path is not None:
                files.append(str(path))
                per_folder.append(knobs_of(stage, read_yaml(path)))
        if per_folder:
            first = dict(per_folder[0])
            differs = _differing_keys(per_folder)
            if differs:
                first["differs_across_seeds"] = differs
            knobs[stage] = first
    return {"files": files, "knobs": knobs}


def discover_seeds(root: Path) -> list[int]:
    return sorted(int(p.name[4:]) for p in root.glob("seed*") if p.is_dir() and p.name[4:].isdigit())


def _check_metrics(path: Path, payload: dict[str, Any]) -> None:
    for split in ("test", "val"):
        block = payload.get(split)
        if split == "test" and not isinstance(block, dict):
            raise ValueError(f"{path}: expected a 'test' mapping of metrics (the test stage writes it)")
        for key, value in (block or {}).items():
            if value is not None and not isinstance(value, int | float):
                raise ValueError(f"{path}: {split}.{key} must be a number or null, got {value!r}")


def read_metrics(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(payload, None), or (None, a short reason) and a warning naming the file when it cannot be used."""
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(payload, dict):
            raise TypeError(f"expected a JSON object, got {type(payload).__name__}")
        _check_metrics(path, payload)
        return payload, None
    except UnicodeDecodeError as error:  # before ValueError: it is one
        reason, detail = "not UTF-8", str(error)
    except json.JSONDecodeError as error:
        reason, detail = "not valid JSON", str(error)
    except OSError as error:
        reason, detail = "unreadable", str(error)
    except (TypeError, ValueError) as error:
        reason, detail = "unexpected content", str(error).removeprefix(f"{path}: ")
    warnings.warn(
        f"{path}: {reason} ({detail}); that seed is left out of the report (rerun the stage that writes it)",
        stacklevel=2,
    )
    return None, reason


def collect_method(root: Path, stage: str, seeds: Sequence[int]) -> dict[str, Any]:
    """mean ± std of the test metrics and the selected checkpoint's biased val accuracy over seeds; a seed
    whose metrics.json is unreadable is left out and listed under `unreadable` (seed → reason)."""
    found: dict[int, dict[str, Any]] = {}
    unreadable: dict[int, str] = {}
    for seed in seeds:
        path = root / f"seed{seed}" / stage / "metrics.json"
        if path.is_file():
            payload, reason = read_metrics(path)
            if payload is None:
                unreadable[seed] = str(reason)
            else:
                found[seed] = payload
    entry: dict[str, Any] = {
        "n": len(found),
        "seeds": sorted(found),
        "missing_seeds": [s for s in seeds if s not in found],
        "unreadable": unreadable,
    }
    for key in (*(k for k, _ in COLUMNS), *EXTRA_KEYS):
        split = key.split("/")[0]
        entry[key] = mean_std([(m.get(split) or {}).get(key) for m in found.values()]) if found else None
    entry["checkpoint_epoch"] = {s: m.get("checkpoint_epoch") for s, m in found.items()}
    # the rule that chose the tested checkpoint: metrics.json's "selection" (e.g. the pseudo-group rule's
    # fallback to the last epoch), else the one the saved hyper-parameters imply (older runs)
    rules = {_selection_rule(m) for m in found.values()}
    entry["selection"] = " / ".join(sorted(rules)) if rules else None
    if stage == "debias" and found:
        entry["num_train_synthetic"] = {s: m.get("num_train_synthetic") for s, m in found.items()}
    entry["groups"] = collect_groups(found)
    return entry


def _selection_rule(metrics: dict[str, Any]) -> str:
    selection = metrics.get("selection")
    if isinstance(selection, dict) and selection.get("rule"):
        return str(selection["rule"])
    return selection_monitor((metrics.get("hparams") or {}).get("selection_bias"))


def collect_topk(root: Path, seeds: Sequence[int]) -> dict[str, Any] | None:
    summaries = {}
    for seed in seeds:
        path = root / f"seed{seed}" / "bias" / "topk_summary.json"
        if path.is_file():
            summaries[seed] = read_json(path)
    if not summaries:
        return None
    first = next(iter(summaries.values()))
    result: dict[str, Any] = {
        "n": len(summaries),
        "k": first.get("k"),
        "per_class": first.get("per_class"),
        "k_source": first.get("k_source", "gce"),
    }
    for key in ("precision", "gce_precision", "recall", "max_precision", "num_selected"):
        values = [s.get(key) for s in summaries.values()]
        result[key] = mean_std(values) if any(v is not None for v in values) else None
    return result


def numeric_leaves(node: Any, prefix: str = "") -> dict[str, float]:
    if isinstance(node, dict):
        out: dict[str, float] = {}
        for key, value in node.items():
            out.update(numeric_leaves(value, f"{prefix}{key}."))
        return out
    if isinstance(node, int | float) and not isinstance(node, bool):
        return {prefix[:-1]: float(node)}
    return {}
