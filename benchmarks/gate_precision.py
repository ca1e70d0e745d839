"""How well does the label-free injection gate pick the CMNIST images that really are new combinations?

The gate (`diffinject.callbacks.injection_check`) judges every written image without a bias label (the bias
model's p of the style's class vs `gate_min_confidence`, content retention) and records its decision in
`gate.csv`; that `accepted` column is what is scored here, whatever rule version wrote it.
Here every written image is also judged by the report's CMNIST ground-truth measurements
(`diffinject.measures.synthetic_set`, fed as `diffinject.report.synthetic.analyse_seed` feeds
them), reading bias labels for analysis only:

- `good`: a true new combination in the direction the label rule asks for, per image exactly as
  `recombination_stats` defines it (label from the content: the shape probe reads the content's digit,
  which is the label, and the estimated colour class is the style image's bias colour);
- `palette_close`: a foreground colour within half the smallest palette gap of a palette colour (what
  `colour_stats` counts as not off-palette), whatever colour it is;
- `reads_label`: the shape probe reads the image's label digit.

For each target: precision = P(target | accepted), recall = P(accepted | target), base rate = P(target) over
every image the gate judged, and lift = precision / base rate (> 1: the gate enriches the set). `criteria`
gives the same against `good` for each per-image signal in `gate.csv` alone (moved: p ≥ the run's
`min_confidence` from `injection_check.json`; retained: the per-image content-retention flag). Seeds
without `gate.csv` (or whose data cannot be rebuilt) are skipped with a note. Run it from the folder the
pipeline ran in (the configs' data paths are relative to it); the shape probe is cached where the report
caches it (`{run}/report/`), so both use the same probe.

    python benchmarks/gate_precision.py --run runs/cmnist/1pct --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from diffinject.callbacks.gate import GATE_COLUMNS, GATE_FILENAME
from diffinject.callbacks.injection_check import CHECK_FILENAME
from diffinject.measures import synthetic_set
from diffinject.report.inputs import mean_std, numeric_leaves, read_json
from diffinject.report.synthetic import (
    DataBundle,
    build_data,
    find_data_config,
    inject_label_from,
    mismatch,
    shape_probe,
)

#: the gate's default threshold, used when `injection_check.json` does not record the one the run used
DEFAULT_MIN_CONFIDENCE = 0.5


def selection_rates(selected: np.ndarray, target: np.ndarray) -> dict[str, float | int | None]:
    """Precision, recall, base rate and lift of a selection against a per-image truth.

    A separate pure function so the arithmetic (and its empty cases: None, never a division by zero) is
    tested on hand-computed numbers without images or a probe.
    """
    selected, target = np.asarray(selected, dtype=bool), np.asarray(target, dtype=bool)
    if selected.shape != target.shape or selected.ndim != 1:
        raise ValueError(
            f"selected and target must be equal-length 1-D arrays, got {selected.shape}, {target.shape}"
        )
    n, n_selected, n_target = len(target), int(selected.sum()), int(target.sum())
    both = int((selected & target).sum())
    precision = both / n_selected if n_selected else None
    base_rate = n_target / n if n else None
    return {
        "precision": precision,
        "recall": both / n_target if n_target else None,
        "base_rate": base_rate,
        "lift": precision / base_rate if precision is not None and base_rate else None,
        "num_images": n,
        "num_selected": n_selected,
        "num_target": n_target,
        "num_both": both,
    }


def read_gate(path: Path) -> dict[int, dict[str, float]]:
    """`gate.csv` by sample index: the figures the gate judged each image on and its decision."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in GATE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; expected {list(GATE_COLUMNS)}")
        return {
            int(row["index"]): {
                "p_style_class": float(row["p_style_class"]),
                "retained": int(row["retained"]),
                "accepted": int(row["accepted"]),
            }
            for row in reader
        }


def recombination_mask(
    shape: np.ndarray, colour: np.ndarray, cols: dict[str, np.ndarray | None], label_from: str | None
) -> np.ndarray | None:
    """Per-image `recombination_stats(...)["recombination"]` (1 image at a time), so `good` is by
    construction the report's definition of a true new combination; None where the report has none."""
    names = ("content_label", "style_label", "content_bias", "style_bias")
    if label_from is None or any(cols[name] is None for name in names):
        return None
    values = [
        synthetic_set.recombination_stats(
            shape[i : i + 1], colour[i : i + 1], *(cols[name][i : i + 1] for name in names), label_from
        )["recombination"]
        for i in range(len(shape))
    ]
    return np.asarray(values, dtype=float) == 1.0


def subset_manifest(manifest: synthetic_set.Manifest, keep: np.ndarray) -> synthetic_set.Manifest:
    """The manifest's rows at positions `keep` (the rows the gate judged)."""
    columns = {k: (v[keep] if v is not None else None) for k, v in manifest.columns.items()}
    return synthetic_set.Manifest(manifest.path, columns, [manifest.images[i] for i in keep])


def gate_threshold(inject: Path) -> float:
    """The gate's `min_confidence` as the run recorded it (the default when it did not)."""
    path = inject / CHECK_FILENAME
    if not path.is_file():
        return DEFAULT_MIN_CONFIDENCE
    gate = read_json(path).get("gate") or {}
    return float(gate.get("min_confidence", DEFAULT_MIN_CONFIDENCE))


def load_data(
    root: Path, seed: int, cache: dict[str, DataBundle | None], notes: list[str]
) -> DataBundle | None:
    """The seed's training data rebuilt from its stage config (one build per distinct config)."""
    located = find_data_config(root, seed)
    if located is None:
        notes.append(f"seed {seed}: no stage config with a data section under {root}")
        return None
    key = json.dumps(located[1], sort_keys=True, default=str)
    if key not in cache:
        try:
            cache[key] = build_data(*located)
        except (OSError, ValueError, RuntimeError, ImportError, TypeError) as error:
            cache[key] = None
            notes.append(f"could not rebuild the data of {located[0]}: {error}")
    return cache[key]


def measure_seed(
    root: Path, seed: int, cache_dir: Path, data_cache: dict[str, DataBundle | None], notes: list[str]
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(this seed's gate figures, the probe's meta), or (None, None) with a note when the seed is skipped."""
    inject = root / f"seed{seed}" / "inject"
    gate_path, manifest_path = inject / GATE_FILENAME, inject / "manifest.csv"
    if not gate_path.is_file() or not manifest_path.is_file():
        missing = GATE_FILENAME if manifest_path.is_file() else "manifest.csv"
        notes.append(
            f"seed {seed}: skipped, no {inject / missing} (inject stage not run, or run without the gate)"
        )
        return None, None
    gate = read_gate(gate_path)
    manifest = synthetic_set.read_manifest(manifest_path)
    data = load_data(root, seed, data_cache, notes)
    if data is None:
        notes.append(f"seed {seed}: skipped, training data could not be rebuilt")
        return None, None
    if data.name != "cmnist":
        notes.append(f"seed {seed}: skipped, {data.name} has no colour/shape ground truth (CMNIST only)")
        return None, None
    problem = mismatch(manifest, data)
    if problem is not None:
        notes.append(f"seed {seed}: skipped, {problem}")
        return None, None
    index = manifest.columns["index"]
    keep = np.flatnonzero(np.isin(index, list(gate)))
    unjudged = len(manifest) - len(keep)
    if unjudged or len(gate) > len(keep):
        notes.append(
            f"seed {seed}: {unjudged} manifest row(s) without a gate line and {len(gate) - len(keep)} gate "
            "line(s) without a manifest row; measured on the rows in both"
        )
    manifest = subset_manifest(manifest, keep)
    cols = manifest.columns
    rows = [gate[int(i)] for i in cols["index"]]
    accepted = np.array([r["accepted"] for r in rows], dtype=bool)
    threshold = gate_threshold(inject)
    moved = np.array([r["p_style_class"] >= threshold for r in rows], dtype=bool)
    retained = np.array([r["retained"] for r in rows], dtype=bool)

    images = synthetic_set.load_images(manifest.images, data.channels)
    probe, probe_meta = shape_probe(data, cache_dir)
    shape = (
        synthetic_set.probe_predict(probe, synthetic_set.shape_gray(images))
        if len(images)
        else np.zeros(0, int)
    )
    estimated, distances = (
        synthetic_set.nearest_palette(synthetic_set.foreground_colour(images))
        if len(images)
        else (np.zeros(0, int), np.zeros(0))
    )
    label_from = inject_label_from(root, seed)
    if label_from is None and cols["content_label"] is not None:  # as analyse_seed infers it
        label_from = "content" if np.array_equal(cols["label"], cols["content_label"]) else "style"
    # not off-palette, as colour_stats counts it (images without a foreground have no colour: not close)
    palette_close = (estimated >= 0) & ~(np.nan_to_num(distances, nan=0.0) > synthetic_set.palette_margin())
    targets = {
        "good": recombination_mask(shape, estimated, cols, label_from),
        "palette_close": palette_close,
        "reads_label": shape == cols["label"],
    }
    result: dict[str, Any] = {
        "num_images": len(accepted),
        "accepted": int(accepted.sum()),
        "accepted_rate": float(accepted.mean()) if len(accepted) else None,
        "label_from": label_from,
        "min_confidence": threshold,
        "targets": {name: selection_rates(accepted, t) for name, t in targets.items() if t is not None},
    }
    if targets["good"] is None:
        notes.append(f"seed {seed}: manifest lacks label/bias columns or the label rule: no `good` target")
    else:
        result["criteria"] = {
            "moved": selection_rates(moved, targets["good"]),
            "retained": selection_rates(retained, targets["good"]),
        }
    return result, probe_meta


#: per-target counts: kept per seed, left out of the summary (their rates are there)
COUNT_LEAVES = ("num_images", "num_selected", "num_target", "num_both")


def summarise(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over seeds of every rate (and the set sizes), keyed by dotted path."""
    leaves = [numeric_leaves(r) for r in per_seed.values()]
    names = sorted(
        {name for leaf in leaves for name in leaf if "." not in name or not name.endswith(COUNT_LEAVES)}
    )
    return {name: mean_std([leaf.get(name) for leaf in leaves]) for name in names}


def gate_precision(root: Path, seeds: list[int], cache_dir: Path) -> dict[str, Any]:
    """Per-seed figures and their mean ± std over the seeds that were measured."""
    notes: list[str] = []
    data_cache: dict[str, DataBundle | None] = {}
    per_seed: dict[int, dict[str, Any]] = {}
    probe = None
    for seed in seeds:
        result, meta = measure_seed(root, seed, cache_dir, data_cache, notes)
        if result is not None:
            per_seed[seed] = result
            probe = meta
    return {
        "run": str(root),
        "seeds": seeds,
        "measured_seeds": sorted(per_seed),
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "probe": probe,
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="the run folder holding seed*/inject")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="shape probe cache (default: {run}/report, the report's)"
    )
    args = parser.parse_args(argv)
    result = gate_precision(args.run, args.seeds, args.cache_dir or args.run / "report")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return result


if __name__ == "__main__":
    main()
