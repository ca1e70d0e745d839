"""The biased-split protocol shared by the generated datasets (Colored MNIST, Corrupted CIFAR-10).

Pure numpy functions, so the protocol is unit-testable without images:

- `stratified_split` holds out a fixed fraction of every class (validation, embedded test split);
- `assign_biased` gives every class its own bias attribute except a fraction `ratio` of each class,
  which gets one of the other attributes uniformly (bias-conflicting samples);
- `assign_uniform` spreads the attributes evenly inside every class (the unbiased test set, ~1/K aligned).

Randomness comes from `rng_for(seed, key)`: one independent stream per purpose, derived from the data seed
only, so a dataset never depends on the global torch/numpy seed or on the order in which streams are used.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

KNOWN_PCTS = {"0.5pct": 0.005, "1pct": 0.01, "2pct": 0.02, "5pct": 0.05}


def rng_for(seed: int, key: str) -> np.random.Generator:
    """Independent generator for one purpose (`key`) of one data seed."""
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def round_half_up(x: float) -> int:
    """Round like a person would (Python's `round` sends 2.5 to 2)."""
    return int(np.floor(x + 0.5))


def pct_name(ratio: float) -> str:
    """Folder name of a conflict ratio as DisEnt spells it: 0.005 -> "0.5pct", 0.01 -> "1pct"."""
    percent = round(ratio * 100, 6)
    return f"{percent:g}pct"


def parse_ratio(value: float | str) -> tuple[float, str]:
    """Accept a ratio (0.01) or a pct folder name ("1pct"); return `(ratio, pct)`.

    Raises ValueError unless the ratio lies strictly between 0 and 1.
    """
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*pct\s*", value)
        if match:
            ratio = float(match.group(1)) / 100
        else:
            try:
                ratio = float(value)
            except ValueError:
                raise ValueError(
                    f"ratio {value!r} is neither a number in (0, 1) nor a pct name such as '1pct' or '0.5pct'"
                ) from None
    else:
        ratio = float(value)
    if not 0.0 < ratio < 1.0:
        raise ValueError(
            f"ratio must be a fraction of bias-conflicting samples strictly between 0 and 1 "
            f"(e.g. 0.005, 0.01, 0.02, 0.05), got {value!r}"
        )
    return ratio, pct_name(ratio)


def stratified_split(
    labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split positions into (kept, held_out), holding out round(n_c * fraction) of every class.

    Both outputs are sorted, so the original order survives inside each part.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    labels = np.asarray(labels)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_hold = round_half_up(len(members) * fraction)
        held.append(rng.permutation(members)[:n_hold])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def num_conflicting(n: int, ratio: float) -> int:
    """Conflicting samples in a class of size n: round(n * ratio), but at least 1 when ratio > 0 and n > 0."""
    if n <= 0 or ratio <= 0:
        return 0
    return min(n, max(1, round_half_up(n * ratio)))


def assign_biased(labels: np.ndarray, ratio: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Bias attribute per sample: the class's own attribute, except `num_conflicting(n_c, ratio)` random
    samples per class that get another attribute chosen uniformly among the remaining `num_classes - 1`."""
    labels = np.asarray(labels, dtype=np.int64)
    biases = labels.copy()
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        k = num_conflicting(len(members), ratio)
        chosen = rng.permutation(members)[:k]
        biases[chosen] = (c + rng.integers(1, num_classes, size=k)) % num_classes
    return biases


def assign_uniform(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Bias attribute per sample spread evenly inside each class (exactly uniform when n_c % K == 0)."""
    labels = np.asarray(labels, dtype=np.int64)
    biases = np.empty_like(labels)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        biases[members] = rng.permutation(np.arange(len(members)) % num_classes)
    return biases


def conflict_summary(labels: np.ndarray, biases: np.ndarray) -> str:
    """`N images, K conflicting (P%)` for logs; bias -1 (unknown, e.g. synthetic) is counted apart."""
    labels = np.asarray(labels)
    biases = np.asarray(biases)
    known = biases >= 0
    n_conf = int(np.sum((labels != biases) & known))
    n_known = int(known.sum())
    share = 100.0 * n_conf / n_known if n_known else 0.0
    text = f"{len(labels)} images, {n_conf} conflicting ({share:.2f}%)"
    if n_known < len(labels):
        text += f", {len(labels) - n_known} with unknown bias"
    return text
