"""The raw (class, bias) test-group matrix over seeds, and whether the worst-group figure means anything.

Why a rule on counts: worst-group accuracy is the minimum over every non-empty (class, bias) test group. With
many small groups (Colored MNIST at 1 %: 10 × 10 groups of ~10 test images) some group is at 0 % for every
method, so the column tells methods apart on nothing; with few, large groups (BFFHQ, Dogs & Cats: 4) it is
the usual robustness figure. The report shows it only when the smallest group any seed tested has at least
`MIN_GROUP_IMAGES` images; it always keeps the value and the matrix in results.json.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

#: the fewest test images every (class, bias) group needs for the table to show worst-group accuracy
MIN_GROUP_IMAGES = 20


def group_counts(payload: dict[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """metrics.json's `test_groups` as (correct, total) per (label, bias) group; None when absent (files
    written before it existed) or malformed."""
    groups = payload.get("test_groups")
    if not isinstance(groups, dict):
        return None
    try:
        correct = np.asarray(groups["correct"], dtype=np.float64)
        total = np.asarray(groups["total"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    if correct.ndim != 2 or correct.shape != total.shape or (correct < 0).any() or (correct > total).any():
        return None
    return correct, total


def collect_groups(found: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """Per (label, bias) test group over the seeds' metrics.json: mean accuracy (null where no seed has the
    group), mean image count, and the smallest non-empty group of any seed. None without counts."""
    counts = {seed: c for seed, c in ((s, group_counts(m)) for s, m in found.items()) if c is not None}
    if not counts or len({correct.shape for correct, _ in counts.values()}) > 1:
        return None
    correct = np.stack([c for c, _ in counts.values()])
    total = np.stack([t for _, t in counts.values()])
    present = (total > 0).sum(0)
    ratio = np.divide(correct, total, out=np.zeros_like(correct), where=total > 0)
    accuracy = np.where(present > 0, ratio.sum(0) / np.maximum(present, 1), math.nan)
    return {
        "rows": "label",
        "columns": "bias",
        "n": len(counts),
        "seeds": sorted(counts),
        "accuracy": [[None if math.isnan(v) else float(v) for v in row] for row in accuracy],
        "count": total.mean(0).tolist(),
        "min_count": int(total[total > 0].min()) if (total > 0).any() else None,
    }


def worst_group_rule(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Whether the table shows worst-group: the smallest test group of any method and seed has at least
    `MIN_GROUP_IMAGES` images. Unknown sizes (no counts in any metrics.json) hide it too."""
    sizes = [(e.get("groups") or {}).get("min_count") for e in methods.values()]
    known = [size for size in sizes if size is not None]
    smallest = min(known) if known else None
    return {
        "shown": smallest is not None and smallest >= MIN_GROUP_IMAGES,
        "smallest_group": smallest,
        "min_group_images": MIN_GROUP_IMAGES,
    }
