"""`samples.png` of the report: real training images, unconditional DDIM samples, synthetic triplets.

Blocks, top to bottom: "real" (one training image per class, no augmentation), "DDIM" (unconditional samples
of the run's `diffusion/unet` export from seeded Gaussian noise, η = 0, S = 50; on the GPU when one is
visible; on a CPU skipped with a note for a UNet wider than `MAX_CPU_SIZE` px or with more weights than
`MAX_CPU_WEIGHT_BYTES`, e.g. the paper-size CMNIST UNet; cached in the report folder per export), and
(style | content | synthetic) columns of the first seed's injection manifest. A block whose input is missing
is left out with a note; nothing is written when neither the DDIM nor the synthetic block exists.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from diffinject.measures import synthetic_set
from diffinject.report import synthetic as rs

COLUMNS = 8
NUM_UNCONDITIONAL = 16
DDIM_STEPS = 50
SAMPLE_SEED = 0
MAX_CPU_SIZE = 64
#: fp32 weights above this are not sampled on a CPU (the 2.6 MB quick UNet: ~5 s; the 64 MB paper one: ~90 s)
MAX_CPU_WEIGHT_BYTES = 32 * 2**20
WEIGHTS = "diffusion_pytorch_model.safetensors"

Row = tuple[str, np.ndarray, list[str], list[str]]  # name, uint8 N×C×H×W, titles, x labels


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (torch.nan_to_num(images.float(), nan=0.0) * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


@torch.no_grad()
def unconditional_samples(
    export_dir: str | Path,
    count: int = NUM_UNCONDITIONAL,
    steps: int = DDIM_STEPS,
    seed: int = SAMPLE_SEED,
    max_cpu_size: int = MAX_CPU_SIZE,
    max_cpu_bytes: int = MAX_CPU_WEIGHT_BYTES,
    cache_dir: Path | None = None,
) -> tuple[np.ndarray | None, str]:
    """uint8 N×C×H×W DDIM samples (η = 0, at the data's image size) and a line saying what was drawn, or
    (None, why not). With `cache_dir`, samples of the same export files and settings are read back."""
    from diffinject.diffusion import (
        ddim_generate,
        ddim_timesteps,
        from_model_space,
        linear_alphas_cumprod,
    )
    from diffinject.nets.unet import INFO_FILENAME, load_unet_export

    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file() or not (export_dir / INFO_FILENAME).is_file():
        return None, f"no diffusion export at {export_dir} (diffusion stage not run)"
    size = json.loads((export_dir / "config.json").read_text()).get("sample_size")
    size = int(max(size) if isinstance(size, list | tuple) else size)
    weights = export_dir / WEIGHTS
    num_bytes = weights.stat().st_size if weights.is_file() else 0
    line = f"{count} DDIM samples (η = 0, S = {steps}, seed {seed}) of {export_dir}"
    key = _cache_key(export_dir, (count, steps, seed))
    cache = cache_dir / f"ddim_samples_{key}.npy" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        return np.load(cache), f"{line} (cached)"
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and (size > max_cpu_size or num_bytes > max_cpu_bytes):
        return None, (
            f"{export_dir}: a {size} px UNet with {num_bytes / 2**20:.0f} MB of weights is too slow to "
            f"sample on a CPU (limits {max_cpu_size} px, {max_cpu_bytes / 2**20:.0f} MB); rerun the report "
            "where a GPU is visible"
        )
    unet, info = load_unet_export(export_dir)
    if info.get("prediction_type", "epsilon") != "epsilon":
        return None, f"{export_dir}: only ε-prediction UNets are sampled, got {info['prediction_type']!r}"
    num_t = int(info.get("num_train_timesteps", 1000))
    abar = linear_alphas_cumprod(
        num_t, float(info.get("beta_start", 1e-4)), float(info.get("beta_end", 0.02))
    )
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn((count, int(unet.config.in_channels), size, size), generator=generator)
    unet = unet.to(device).eval().requires_grad_(False)
    x = ddim_generate(unet, x_T.to(device), abar, ddim_timesteps(num_t, steps))
    images = from_model_space(x.float().cpu(), int(info.get("image_size", size)))
    samples = _to_uint8(images)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, samples)
    return samples, line


def _cache_key(export_dir: Path, settings: tuple[int, ...]) -> str:
    """The export's files (config, info, weights' size and mtime) and the sampling settings."""
    weights = export_dir / WEIGHTS
    stat = (weights.stat().st_size, weights.stat().st_mtime_ns) if weights.is_file() else (0, 0)
    digest = hashlib.sha1(repr((settings, stat)).encode())
    for name in ("config.json", "diffusion_info.json"):
        digest.update((export_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def real_rows(data: rs.DataBundle, count: int = COLUMNS) -> list[Row]:
    """One training image per class (first in index order), then the next images, up to `count`."""
    labels = rs.labels_of(data.train)
    first = [int(np.flatnonzero(labels == c)[0]) for c in range(data.num_classes) if (labels == c).any()]
    taken = set(first)
    rest = [i for i in range(len(labels)) if i not in taken][: max(0, count - len(first))]
    chosen = (first + rest)[:count]
    return [("real", rs.images_at(data.train, chosen), [f"y={labels[i]}" for i in chosen], [])]


def triplet_rows(
    manifest: synthetic_set.Manifest, images: np.ndarray, data: rs.DataBundle | None, count: int = COLUMNS
) -> list[Row]:
    """Rows style, content, synthetic of the manifest's first `count` rows (without data: synthetic only)."""
    count = min(count, len(manifest))
    cols = manifest.columns
    titles = [f"#{cols['index'][c]} y={cols['label'][c]}" for c in range(count)]
    rows: list[Row] = []
    if data is not None:
        rows.append(("style", rs.images_at(data.train, cols["style_index"][:count]), titles, []))
        rows.append(("content", rs.images_at(data.train, cols["content_index"][:count]), [], []))
    marks: list[str] = []
    if data is not None and data.name == "cmnist":
        colours = synthetic_set.estimate_colour_classes(images[:count])
        marks = [f"colour {k}{' ≠ y' if k != cols['label'][c] else ''}" for c, k in enumerate(colours)]
    rows.append(("synthetic", images[:count], [] if rows else titles, marks))
    return rows


def samples_figure(path: Path, rows: Sequence[Row], title: str) -> Path:
    """One image per cell, `COLUMNS` per row; a row label on the left."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no backend switch

    columns = max(len(block) for _, block, _, _ in rows)
    fig = Figure(figsize=(1.3 * columns, 1.45 * len(rows)))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for r, (name, block, titles, marks) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(block):
                ax.axis("off")
                continue
            picture = block[c].transpose(1, 2, 0)
            ax.imshow(picture[..., 0] if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=255)
            if c == 0:
                ax.set_ylabel(name)
            if c < len(titles):
                ax.set_title(titles[c], fontsize=8)
            if c < len(marks):
                ax.set_xlabel(marks[c], fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _rebuild_data(root: Path, seeds: Sequence[int]) -> tuple[rs.DataBundle | None, str | None]:
    located = next((f for f in (rs.find_data_config(root, s) for s in seeds) if f), None)
    located = located or rs.find_data_config(root, None)
    if located is None:
        return None, "no stage config names the data"
    try:
        return rs.build_data(*located), None
    except (OSError, ValueError, RuntimeError, ImportError, TypeError) as error:
        return None, f"could not rebuild the data of {located[0]}: {error}"


def write_samples(
    path: Path, root: Path, seeds: Sequence[int], sample: rs.Sample | None
) -> tuple[Path | None, list[str]]:
    """Write `samples.png` (see module doc); returns its path (None when not written) and report notes."""
    manifest, images, data = sample if sample is not None else (None, None, None)
    has_triplets = manifest is not None and len(manifest) > 0
    generated, line = unconditional_samples(root / "diffusion" / "unet", cache_dir=path.parent)
    notes = [] if generated is not None else [f"samples.png has no DDIM samples: {line}"]
    if generated is None and not has_triplets:
        return None, [
            *notes,
            "samples.png not written: no diffusion samples and no synthetic images (stages not run)",
        ]
    real_data, why = (data, None) if data is not None else _rebuild_data(root, seeds)
    rows: list[Row] = real_rows(real_data) if real_data is not None else []
    if real_data is None:
        notes.append(f"samples.png has no real images: {why}")
    if generated is not None:
        for start in range(0, len(generated), COLUMNS):
            rows.append(("DDIM", generated[start : start + COLUMNS], [], []))
    if has_triplets:
        rows += triplet_rows(manifest, images, data)
    parts = ["real" if real_data is not None else "", "DDIM samples" if generated is not None else ""]
    parts.append(f"style / content / synthetic ({manifest.path.parent.parent.name})" if has_triplets else "")
    return samples_figure(path, rows, " | ".join(p for p in parts if p)), notes
