"""The synthetic-set part of the report: rebuild the training data, audit each seed's injection output.

The data module is rebuilt from the config a stage ran (`pipeline_config.yaml`, or Lightning's `config.yaml`),
so training images can be read by the manifest's content/style indices. Measurements live in
`diffinject.measures.synthetic_set`; this module feeds them and caches the shape probe under `{root}/report/`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffinject.data.sections import source_data_section
from diffinject.measures import synthetic_set
from diffinject.report.inputs import (
    CONFIG_NAMES,
    GENERATED_SETS,
    mean_std,
    numeric_leaves,
    read_yaml,
    stage_config_path,
)

#: data init args that do not change which images the splits hold
NON_DATA_ARGS = ("batch_size", "num_workers", "synthetic_manifest", "on_bad_image", "synthetic_control")
PROBE_VERSION = 1
PIXEL_DISTANCE_SAMPLES = 512


def resolve_class(class_path: str) -> type:
    """A short name from `diffinject.data` (what configs use) or a dotted import path."""
    if "." not in class_path:
        module, name = importlib.import_module("diffinject.data"), class_path
    else:
        module_name, _, name = class_path.rpartition(".")
        module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"data class {class_path!r} not found in {module.__name__}")
    return getattr(module, name)


def find_data_config(root: Path, seed: int | None) -> tuple[Path, dict[str, Any]] | None:
    """The first stage config of this seed (inject first: it ran on the data the manifest indexes)."""
    folders = []
    if seed is not None:
        folders += [root / f"seed{seed}" / stage for stage in ("inject", "debias", "bias", "vanilla", "lff")]
    folders += [root / "diffusion"]
    for folder in folders:
        for name in CONFIG_NAMES:
            path = folder / name
            if path.is_file():
                section = source_data_section(read_yaml(path))
                if section is not None:
                    return path, section
    return None


@dataclass
class DataBundle:
    """The training (without augmentation) and test splits of the dataset a run used."""

    config_path: Path
    section: dict[str, Any]
    name: str
    num_classes: int
    channels: int
    train: Any
    test: Any

    @property
    def key(self) -> str:
        init = {k: v for k, v in (self.section.get("init_args") or {}).items() if k not in NON_DATA_ARGS}
        text = json.dumps({"class": self.section["class_path"], "init": init}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def build_data(config_path: Path, section: dict[str, Any]) -> DataBundle:
    cls = resolve_class(section["class_path"])
    init = {k: v for k, v in (section.get("init_args") or {}).items() if k != "synthetic_manifest"}
    module = cls(**init)
    module.setup("fit")
    module.setup("test")
    return DataBundle(
        config_path,
        section,
        module.name,
        int(module.num_classes),
        int(module.channels),
        module.train_eval_dataset,
        module.test_dataset,
    )


def inject_label_from(root: Path, seed: int) -> str | None:
    """The injection stage's label rule (`content` or `style`) from its config, None when unknown."""
    path = stage_config_path(root / f"seed{seed}" / "inject")
    if path is None:
        return None
    value = ((read_yaml(path).get("data") or {}).get("init_args") or {}).get("label_from")
    return value if value in ("content", "style") else None


def images_at(dataset: Any, indices: np.ndarray | list[int]) -> np.ndarray:
    """uint8 N×C×H×W of dataset items by position (in-memory uint8 tensors are read directly)."""
    indices = np.asarray(indices, dtype=np.int64)
    stored = getattr(dataset, "images", None)
    plain = getattr(dataset, "transform", None) is None
    if isinstance(stored, torch.Tensor) and stored.dtype == torch.uint8 and plain:
        return stored[torch.from_numpy(indices)].numpy()
    if len(indices) == 0:
        return np.zeros((0, 3, 1, 1), dtype=np.uint8)
    items = [dataset[int(i)]["image"] for i in indices]
    return (torch.stack(items) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


def labels_of(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels, dtype=np.int64)
    return np.array([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=np.int64)


def mismatch(manifest: synthetic_set.Manifest, data: DataBundle) -> str | None:
    """Why the rebuilt data is not the data the manifest indexes (None when indices and labels agree).

    A relative `root` or `source: auto` can resolve differently from another working directory."""
    cols = manifest.columns
    labels = labels_of(data.train)
    for role in ("content", "style"):
        index = cols[f"{role}_index"]
        if len(index) and (index.min() < 0 or index.max() >= len(labels)):
            return (
                f"{manifest.path}: {role}_index up to {index.max()} but the data rebuilt from "
                f"{data.config_path} has {len(labels)} training images"
            )
        recorded = cols[f"{role}_label"]
        if recorded is not None and len(index) and not np.array_equal(labels[index], recorded):
            wrong = int((labels[index] != recorded).sum())
            return (
                f"{manifest.path}: {wrong} {role} label(s) differ from the data rebuilt from "
                f"{data.config_path} (run the report from the folder the pipeline ran in)"
            )
    return None


def shape_probe(data: DataBundle, cache_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train (or load from `cache_dir`) the colour-free shape probe on the training split's task labels."""
    cache = cache_dir / f"shape_probe_{data.key}.pt"
    train_gray = synthetic_set.shape_gray(images_at(data.train, np.arange(len(data.train))))
    if cache.is_file():
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        meta = saved.get("meta", {})
        if meta.get("version") == PROBE_VERSION and meta.get("key") == data.key:
            probe = synthetic_set.build_shape_probe(train_gray[0].size, data.num_classes, meta["hidden"])
            probe.load_state_dict(saved["state_dict"])
            return probe.eval(), {**meta, "cached": True}
    hidden = 64
    probe = synthetic_set.train_shape_probe(
        train_gray, labels_of(data.train), data.num_classes, hidden=hidden
    )
    test_gray = synthetic_set.shape_gray(images_at(data.test, np.arange(len(data.test))))
    meta = {
        "version": PROBE_VERSION,
        "key": data.key,
        "hidden": hidden,
        "train_acc": float((synthetic_set.probe_predict(probe, train_gray) == labels_of(data.train)).mean()),
        "test_acc": float((synthetic_set.probe_predict(probe, test_gray) == labels_of(data.test)).mean()),
        "num_train": len(train_gray),
        "num_test": len(test_gray),
        "data_config": str(data.config_path),
    }
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": probe.state_dict(), "meta": meta}, cache)
    return probe, {**meta, "cached": False}


def analyse_seed(
    manifest: synthetic_set.Manifest,
    images: np.ndarray,
    data: DataBundle | None,
    label_from: str | None,
    probe: torch.nn.Module | None,
) -> dict[str, Any]:
    """Every measurement of one seed's synthetic set that its inputs allow (notes say what was skipped)."""
    cols = manifest.columns
    labels = cols["label"]
    result: dict[str, Any] = {"size": len(manifest), "manifest": str(manifest.path), "notes": []}
    if label_from is None and cols["content_label"] is not None:
        label_from = "content" if np.array_equal(labels, cols["content_label"]) else "style"
    result["label_from"] = label_from
    if len(manifest) == 0:
        result["notes"].append(f"{manifest.path} has no rows")
        return result
    result.update(synthetic_set.diversity_stats(cols["content_index"], cols["style_index"]))
    if all(cols[c] is not None for c in ("content_label", "content_bias", "style_bias")) and label_from:
        result["nominal"] = synthetic_set.nominal_stats(
            labels, cols["content_label"], cols["content_bias"], cols["style_bias"], label_from
        )
    if data is None:
        result["notes"].append("training data could not be rebuilt: no colour/shape/pixel measurements")
        return result
    subset = np.arange(min(len(manifest), PIXEL_DISTANCE_SAMPLES))
    content = images_at(data.train, cols["content_index"][subset])
    style = images_at(data.train, cols["style_index"][subset])
    if content.shape[1:] == images.shape[1:]:
        result["pixels"] = synthetic_set.pixel_distance_stats(images[subset], content, style)
        result["pixels"]["num_images"] = len(subset)
    if data.name != "cmnist":
        result["notes"].append(
            f"{data.name}: no generic colour/shape measurement; conflict rates below are nominal (from the "
            "manifest's bias labels), not measured on the images"
        )
        return result
    directions = synthetic_set.foreground_colour(images)
    estimated, distances = synthetic_set.nearest_palette(directions)
    result["colour"] = synthetic_set.colour_stats(
        estimated, labels, cols["content_bias"], cols["style_bias"], distances, synthetic_set.palette_margin()
    )
    if probe is not None:
        predicted = synthetic_set.probe_predict(probe, synthetic_set.shape_gray(images))
        result["shape"] = synthetic_set.shape_stats(
            predicted, labels, cols["content_label"], cols["style_label"]
        )
        result["recombination"] = synthetic_set.recombination_stats(
            predicted, estimated, cols["content_label"], cols["style_label"], cols["content_bias"],
            cols["style_bias"], label_from,
        )  # fmt: skip
    return result


Sample = tuple[synthetic_set.Manifest, np.ndarray, DataBundle | None]


def trained_manifest(inject: Path) -> Path | None:
    """The synthetic set the debias stage trains on: the gate's accepted rows when the gate wrote them and
    kept any (`manifest_accepted.csv`), else everything the inject stage wrote (`manifest.csv`)."""
    accepted, written = inject / "manifest_accepted.csv", inject / "manifest.csv"
    if accepted.is_file() and len(accepted.read_text().strip().splitlines()) > 1:
        return accepted
    return written if written.is_file() else None


def collect_synthetic(
    root: Path, seeds: Sequence[int], report_dir: Path
) -> tuple[dict[str, Any] | None, Sample | None]:
    """Per-seed measurements of the synthetic sets with their mean ± std, and the first seed's set (for
    `report.samples`); (None, None) when no seed has an injection manifest."""
    per_seed: dict[int, dict[str, Any]] = {}
    notes: list[str] = []
    data_cache: dict[str, DataBundle | None] = {}
    probe_info = None
    first_sample = None
    for seed in seeds:
        manifest_path = trained_manifest(root / f"seed{seed}" / "inject")
        if manifest_path is None:
            continue
        manifest = synthetic_set.read_manifest(manifest_path)
        data = None
        located = find_data_config(root, seed)
        if located is not None:
            key = json.dumps(located[1], sort_keys=True, default=str)
            if key not in data_cache:
                try:
                    data_cache[key] = build_data(*located)
                except (OSError, ValueError, RuntimeError, ImportError, TypeError) as error:
                    data_cache[key] = None
                    notes.append(f"could not rebuild the data of {located[0]}: {error}")
            data = data_cache[key]
        problem = mismatch(manifest, data) if data is not None else None
        if problem is not None:
            notes.append(f"{problem}; image measurements skipped for seed {seed}")
            data = None
        images = synthetic_set.load_images(manifest.images, data.channels if data else 3)
        probe = None
        if data is not None and data.name == "cmnist":
            probe, probe_info = shape_probe(data, report_dir)
        per_seed[seed] = analyse_seed(manifest, images, data, inject_label_from(root, seed), probe)
        if first_sample is None:
            first_sample = (manifest, images, data)
    if not per_seed:
        return None, None
    leaves = [numeric_leaves({k: v for k, v in r.items() if k != "notes"}) for r in per_seed.values()]
    names = sorted({name for leaf in leaves for name in leaf})
    summary = {name: mean_std([leaf.get(name) for leaf in leaves]) for name in names}
    notes += sorted({note for r in per_seed.values() for note in r["notes"]})
    return {"per_seed": per_seed, "summary": summary, "probe": probe_info, "notes": notes}, first_sample


def collect_generated(root: Path, seeds: Sequence[int], report_dir: Path) -> dict[str, Any] | None:
    """The generative baselines' image sets (`inputs.GENERATED_SETS`), measured as the injection's are where
    the data allow (Colored MNIST: the shape probe and the palette), with mean ± std over seeds."""
    sets: dict[str, Any] = {}
    data_cache: dict[str, DataBundle | None] = {}
    for stage, name in GENERATED_SETS:
        per_seed: dict[int, dict[str, Any]] = {}
        for seed in seeds:
            path = root / f"seed{seed}" / stage / "manifest.csv"
            if not path.is_file():
                continue
            manifest = synthetic_set.read_manifest(path)
            result: dict[str, Any] = {"size": len(manifest)}
            located = find_data_config(root, seed)
            key = json.dumps(located[1], sort_keys=True, default=str) if located else ""
            if located is not None and key not in data_cache:
                try:
                    data_cache[key] = build_data(*located)
                except (OSError, ValueError, RuntimeError, ImportError, TypeError):
                    data_cache[key] = None
            data = data_cache.get(key)
            if len(manifest) and data is not None and data.name == "cmnist":
                images = synthetic_set.load_images(manifest.images, data.channels)
                colour, distances = synthetic_set.nearest_palette(synthetic_set.foreground_colour(images))
                probe, _ = shape_probe(data, report_dir)
                shape = synthetic_set.probe_predict(probe, synthetic_set.shape_gray(images))
                labels = manifest.columns["label"]
                margin = synthetic_set.palette_margin()
                result.update(synthetic_set.generated_stats(shape, colour, labels, distances, margin))
            per_seed[seed] = result
        if per_seed:
            leaves = [numeric_leaves(r) for r in per_seed.values()]
            names = sorted({n for leaf in leaves for n in leaf})
            summary = {n: mean_std([leaf.get(n) for leaf in leaves]) for n in names}
            sets[stage] = {"name": name, "per_seed": per_seed, "summary": summary}
    return sets or None
