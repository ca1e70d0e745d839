"""Does the label-free injection check rank injection settings the way the CMNIST probe does?

For each finished inject folder (e.g. the study variants' `runs/study/<variant>/cmnist/1pct/seed0/inject`)
it prints one JSON line with the check's figures and, for CMNIST, the probe's figures on the same samples
(the first n rows by index, n = the check's): the colour estimator and the colour-free shape probe of
`diffinject.measures.synthetic_set` (as `benchmarks/hspace_probe.py` uses them); bias labels are read
here only to validate. The last line holds the Spearman rank correlations across folders between the
check's figures and the probe's "content shape + style colour" rate (and component-wise: bias moved vs
colour = style, retention vs shape = content).

The check comes from the folder's `injection_check.json`; when that is missing (a run made before the check
existed) or with `--recompute`, it is computed here from the folder's `pipeline_config.yaml`: its U-Net, its
training data, and the bias checkpoint of its `InjectionCheck` entry (else `<seed folder>/bias/checkpoints/
best.ckpt`). Run it from the folder the pipeline ran in (the configs' paths are relative to it).

    python benchmarks/injection_check_rank.py runs/study/*/cmnist/1pct/seed0/inject
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffinject.callbacks.injection_check import CHECK_FILENAME, check_folder
from diffinject.data.sections import source_data_section
from diffinject.measures import synthetic_set
from diffinject.measures.injection_check import DEFAULT_FEATURE_T
from diffinject.nets.unet import load_unet_export
from diffinject.report.inputs import read_yaml, stage_config_path
from diffinject.report.synthetic import DataBundle, build_data, images_at, labels_of
from diffinject.stages.weights import load_classifier_checkpoint

PROBE_TARGET = "content shape + style colour"
#: (check figure, probe figure) pairs whose rank correlation across folders is reported
PAIRS = (
    ("bias_moved", PROBE_TARGET),
    ("bias_moved_when_differ", PROBE_TARGET),
    ("content_retention", PROBE_TARGET),
    ("content_retention_raw", PROBE_TARGET),
    ("moved_and_retained", PROBE_TARGET),
    ("bias_moved", "colour=style"),
    ("content_retention", "shape=content"),
    ("content_retention_raw", "shape=content"),
)


def rank(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float | None], b: list[float | None]) -> float | None:
    """Spearman's ρ over the pairs where both are known (None: fewer than 3, or one side constant)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    ra, rb = (rank(np.asarray(column, dtype=np.float64)) for column in zip(*pairs, strict=True))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def bias_checkpoint_of(folder: Path, config: dict[str, Any]) -> Path:
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("InjectionCheck"):
            return Path(callback["init_args"]["bias_checkpoint"])
    return folder.parent / "bias" / "checkpoints" / "best.ckpt"


def compute_check(folder: Path, config: dict[str, Any], data: DataBundle, max_samples: int, t: int) -> dict:
    unet, _ = load_unet_export(config["model"]["init_args"]["unet"])
    unet = unet.eval().requires_grad_(False)
    image_size = int(data.train[0]["image"].shape[-1])
    expect = {"num_classes": data.num_classes, "in_channels": data.channels, "image_size": image_size}
    bias_net, _ = load_classifier_checkpoint(bias_checkpoint_of(folder, config), expect)
    return check_folder(folder, bias_net, unet, int(unet.config.sample_size), data.train, max_samples, t)


def probe_figures(folder: Path, n: int, data: DataBundle, probe: torch.nn.Module) -> dict[str, float]:
    manifest = synthetic_set.read_manifest(folder / "manifest.csv")
    order = np.argsort(manifest.columns["index"], kind="stable")[:n]
    cols = {k: v[order] for k, v in manifest.columns.items() if v is not None}
    images = synthetic_set.load_images([manifest.images[i] for i in order], data.channels)
    colour = synthetic_set.estimate_colour_classes(images)
    shape = synthetic_set.probe_predict(probe, synthetic_set.shape_gray(images))
    labels = labels_of(data.train)
    content_label, style_label = labels[cols["content_index"]], labels[cols["style_index"]]
    c_shape, s_shape = shape == content_label, shape == style_label
    c_col, s_col = colour == cols["content_bias"], colour == cols["style_bias"]
    return {
        "n": int(len(order)),
        "shape=content": float(c_shape.mean()),
        "shape=style": float(s_shape.mean()),
        "colour=content": float(c_col.mean()),
        "colour=style": float(s_col.mean()),
        PROBE_TARGET: float((c_shape & s_col).mean()),
        "style shape + content colour": float((s_shape & c_col).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="finished inject folders")
    parser.add_argument("--recompute", action="store_true", help="ignore injection_check.json")
    parser.add_argument("--max-samples", type=int, default=512, help="when computing the check here")
    parser.add_argument("--feature-t", type=int, default=DEFAULT_FEATURE_T, help="when computing it here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    datasets: dict[str, DataBundle] = {}
    probes: dict[str, torch.nn.Module] = {}
    rows = []
    for folder in args.folders:
        config_path = stage_config_path(folder)
        if config_path is None:
            raise FileNotFoundError(
                f"{folder}: no pipeline_config.yaml or config.yaml (not an inject folder?)"
            )
        config = read_yaml(config_path)
        section = source_data_section(config)
        if section is None:
            raise ValueError(f"{config_path}: no data module section")
        key = DataBundle(config_path, section, "", 0, 0, None, None).key  # the split's identity only
        if key not in datasets:
            datasets[key] = build_data(config_path, section)
        data = datasets[key]
        check_file = folder / CHECK_FILENAME
        if check_file.is_file() and not args.recompute:
            check, source = json.loads(check_file.read_text()), str(check_file)
        else:
            check, source = compute_check(folder, config, data, args.max_samples, args.feature_t), "computed"
        row: dict[str, Any] = {"folder": str(folder), "check_source": source, "check": check}
        if data.name == "cmnist" and check.get("n"):
            if data.key not in probes:
                gray = synthetic_set.shape_gray(images_at(data.train, np.arange(len(data.train))))
                probes[data.key] = synthetic_set.train_shape_probe(
                    gray, labels_of(data.train), data.num_classes
                )
            row["probe"] = probe_figures(folder, int(check["n"]), data, probes[data.key])
        rows.append(row)
        print(json.dumps(row), flush=True)

    with_probe = [r for r in rows if "probe" in r]
    correlations = {
        f"{check_key} ~ {probe_key}": spearman(
            [r["check"].get(check_key) for r in with_probe], [r["probe"][probe_key] for r in with_probe]
        )
        for check_key, probe_key in PAIRS
    }
    print(json.dumps({"spearman": correlations, "folders": len(with_probe)}), flush=True)


if __name__ == "__main__":
    main()
