"""AmpliBias, stage 2 of 2: sample the seed's top-K generator and label every sample (the amplified set).

Reads `AmpliBiasGAN`'s export (`stages.gan_export`: generator.safetensors + gan_info.json) and draws
N = int(ratio × |train|) samples, sample i from noise seeded by `GeneratorSamplesDataModule`'s plan alone, in
fixed-size chunks (`micro_batch`, last chunk padded) so its pixels do not depend on batching or resumes.

**Label rule — our choice.** How AmpliBias labels generated images is unconfirmed (research note §2.1:
per-class generators, a conditional generator or a classifier are all possible; no generation code was
released). The
generator here is unconditional and pooled over classes, so each sample takes **the class of its nearest top-K
image**: pixel L2 in data space by default (`label_space: pixel`), or L2 between the penultimate
features of the seed's bias model (`label_space: bias_features`, needs `bias_model`). Ties go to the lower
training index. The distance is taken on the sample as written (8-bit), so a PNG alone determines its row.
Manifest row (the inject stage's columns, `callbacks.synthetic_writer.MANIFEST_COLUMNS`): `content_index` =
that nearest top-K image's training index (the `content_copy` control then serves exactly that top-K image per
slot: oversampling without a generator), `style_index` / `style_label` / `style_bias` = -1, `label` =
`content_label` = its class, `content_bias` = its bias (evaluation only).

Memorisation: a GAN trained on ~10 images per class may just reproduce them. `memorisation_summary`
compares each sample's pixel distance to its nearest top-K image with the top-K images' own nearest-neighbour
distances; the writer (`callbacks.amplibias_writer`) records it as `memorisation.json` beside the manifest.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from diffinject.diffusion.preprocess import from_model_space
from diffinject.nets.gan_fast import FastGenerator
from diffinject.stages.gan_export import GAN_INFO, load_gan_export
from diffinject.stages.weights import load_classifier_checkpoint

LABEL_SPACES = ("pixel", "bias_features")
FIT_HINT = "diffinject fit --config configs/<dataset>/amplibias_gan.yaml"
#: quantiles reported for both distance distributions
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def penultimate(net: nn.Module) -> nn.Module:
    """A copy of a classifier with its last `nn.Linear` replaced by identity: its penultimate features."""
    net = copy.deepcopy(net)
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head to strip for bias_features")
    parent_name, _, child = names[-1].rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    setattr(parent, child, nn.Identity())
    return net


def nearest(queries: Tensor, refs: Tensor) -> tuple[Tensor, Tensor]:
    """(position, L2 distance) of each query's nearest reference (rows flattened; ties → lower position).

    Exact pairwise differences (no matrix-product shortcut), so a row's answer does not depend on the
    other rows in the batch.
    """
    q, r = queries.flatten(1).double(), refs.flatten(1).double()
    dist = torch.cdist(q, r, compute_mode="donot_use_mm_for_euclid_dist")
    best = dist.min(dim=1)
    return best.indices, best.values  # torch's argmin returns the first minimum


def topk_nearest_neighbour(images: Tensor) -> Tensor:
    """Each top-K image's L2 distance to its nearest *other* top-K image (inf when K = 1)."""
    flat = images.flatten(1).double()
    dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(math.inf)
    return dist.min(dim=1).values


def _describe(values: np.ndarray, bins: np.ndarray) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"count": 0}
    return {
        "count": int(finite.size),
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "quantiles": {f"{q:g}": float(np.quantile(finite, q)) for q in QUANTILES},
        "histogram": np.histogram(finite, bins=bins)[0].tolist(),
    }


def memorisation_summary(sample_rms: np.ndarray, topk_rms: np.ndarray, bins: int = 20) -> dict[str, Any]:
    """How close samples sit to the top-K compared with how close top-K images sit to each other.

    Distances are RMS pixel differences in data space ([0, 1], L2 / √(C·H·W)). A generator that memorises
    puts its samples far nearer to a top-K image than any two top-K images are (`fraction_below_topk_min`
    near 1, `median_ratio` near 0); one that makes new images sits at about the top-K spacing (ratio ~1).
    """
    finite_topk = topk_rms[np.isfinite(topk_rms)]
    top = float(max(sample_rms.max(initial=0.0), finite_topk.max(initial=0.0)))
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    summary: dict[str, Any] = {
        "distance": "RMS pixel difference in data space, [0, 1] units: L2 / sqrt(C*H*W)",
        "histogram_edges": edges.tolist(),
        "samples_to_nearest_topk": _describe(sample_rms, edges),
        "topk_to_nearest_other_topk": _describe(topk_rms, edges),
    }
    if finite_topk.size and sample_rms.size:
        summary["fraction_below_topk_min"] = float((sample_rms < finite_topk.min()).mean())
        summary["fraction_below_topk_median"] = float((sample_rms < np.median(finite_topk)).mean())
        median_topk = float(np.median(finite_topk))
        summary["median_ratio"] = float(np.median(sample_rms) / median_topk) if median_topk > 0 else None
    return summary


class AmpliBiasGenerate(LightningModule):
    """Predict-only: noise seeds in, 8-bit samples at the data's size + their manifest rows out.

    Args:
        generator: the fit stage's export folder (runs/{dataset}/{pct}/amplibias_gan/generator).
        label_space: where "nearest top-K image" is measured: "pixel" (data space) or "bias_features".
        bias_model: the seed's bias checkpoint (bias/checkpoints/best.ckpt), for label_space bias_features.
        micro_batch: samples per generator pass (fixed shape, last chunk padded).
    """

    def __init__(
        self,
        generator: str,
        label_space: str = "pixel",
        bias_model: str | None = None,
        micro_batch: int = 64,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if label_space not in LABEL_SPACES:
            raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}")
        if label_space == "bias_features" and bias_model is None:
            raise ValueError(
                "label_space: bias_features needs bias_model (the seed's bias/checkpoints/best.ckpt)"
            )
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        loaded = load_gan_export(generator, FastGenerator, hint=FIT_HINT)
        self.info = loaded.info
        self.net = loaded.generator
        self.nz = int(self.net.nz)
        #: sha256 of the weights: the writer refuses to resume a folder made from other weights
        self.weights_sha256 = loaded.generator_sha256
        self.features: nn.Module | None = None
        if label_space == "bias_features":
            classifier, _ = load_classifier_checkpoint(bias_model, expect={})
            self.features = penultimate(classifier).eval().requires_grad_(False)
        self.pool: Any = None
        self._refs: Tensor | None = None

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or getattr(datamodule, "pool", None) is None or not hasattr(datamodule, "plan"):
            raise TypeError(
                "AmpliBiasGenerate needs data.class_path: "
                f"diffinject.data.topk_images.GeneratorSamplesDataModule, got {type(datamodule).__name__}"
            )
        info_path = Path(self.hparams.generator) / GAN_INFO
        for attr in ("channels", "image_size"):
            if int(getattr(datamodule, attr)) != int(self.info.get(attr, -1)):
                raise ValueError(
                    f"{info_path}: the generator was trained on {attr}={self.info.get(attr)} but the data "
                    f"module serves {attr}={getattr(datamodule, attr)}"
                )
        self._check_topk(datamodule, info_path)
        self.pool = datamodule.pool
        self._refs = None

    def _check_topk(self, datamodule: Any, info_path: Path) -> None:
        """The samples are labelled against the top-K the generator learned: the same file and selection."""
        from diffinject.nets.fingerprint import file_sha256

        trained = self.info.get("topk") or {}
        current = {
            "sha256": file_sha256(datamodule.topk_path),
            "k": datamodule.k,
            "k_source": datamodule.k_source,
        }
        differ = [key for key in current if key in trained and trained[key] != current[key]]
        if differ:
            raise ValueError(
                f"{info_path}: the generator was trained on another top-K ({trained.get('path')}) than "
                f"{datamodule.topk_path} ({'; '.join(f'{k} {trained[k]} vs {current[k]}' for k in differ)}); "
                f"retrain it (`{FIT_HINT}`) or point data.init_args.topk at the file it was trained on"
            )

    def _embed(self, images: Tensor) -> Tensor:
        """Images ([0, 1], data space) → the vectors the label rule compares (pixels: float64)."""
        if self.features is None:
            return images.double().flatten(1)
        self.features.to(images.device)
        return self.features(images.float()).flatten(1)

    def _references(self) -> Tensor:
        if self._refs is None:
            self._refs = self._embed(self.pool.images.to(self.device))
        return self._refs

    # ---------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(self, noise_seeds: list[int]) -> Tensor:
        """uint8 samples B×C×H×W at the data's size; sample b depends on noise_seeds[b] only."""
        noise = torch.stack(
            [torch.randn(self.nz, generator=torch.Generator().manual_seed(int(s))) for s in noise_seeds]
        ).to(self.device)
        chunk = int(self.hparams.micro_batch)
        out = []
        for start in range(0, len(noise_seeds), chunk):
            rows = list(range(start, min(start + chunk, len(noise_seeds))))
            padded = rows + [start] * (chunk - len(rows))
            with torch.autocast(device_type=self.device.type, enabled=False):
                x = self.net(noise[padded]).float()[: len(rows)]
            out.append(from_model_space(x, int(self.info["image_size"])))
        return (torch.cat(out) * 255.0).round().to(torch.uint8)

    @torch.no_grad()
    def label_rows(self, indices: list[int], images_u8: Tensor) -> list[dict[str, int]]:
        """Manifest rows (no `path`) of samples as written: the nearest top-K image gives label, content."""
        images = images_u8.to(self.device).double() / 255.0
        position, _ = nearest(self._embed(images), self._references())
        pool = self.pool
        rows = []
        for index, p in zip(indices, position.tolist(), strict=True):
            label = int(pool.labels[p])
            rows.append(
                {
                    "index": int(index),
                    "content_index": int(pool.indices[p]),
                    "style_index": -1,
                    "label": label,
                    "content_label": label,
                    "style_label": -1,
                    "content_bias": int(pool.biases[p]),
                    "style_bias": -1,
                }
            )
        return rows

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        indices = [int(i) for i in batch["index"]]
        images = self.generate([int(s) for s in batch["noise_seed"]])
        return {
            "index": torch.tensor(indices),
            "images": images.cpu(),
            "rows": self.label_rows(indices, images),
        }

    def on_predict_start(self) -> None:
        self.net.eval()

    # ----------------------------------------------------------------------------------- memorisation
    @torch.no_grad()
    def memorisation(self, images_u8: Tensor) -> dict[str, Any]:
        """`memorisation_summary` of the written samples (uint8 N×C×H×W) against this pool, plus counts."""
        pool = self.pool
        refs = pool.images.double()
        dims = float(refs[0].numel())
        samples = images_u8.double() / 255.0
        chunks = [nearest(samples[i : i + 256], refs) for i in range(0, len(samples), 256)]
        positions = torch.cat([c[0] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
        dist = torch.cat([c[1] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.float64)
        summary = memorisation_summary(
            (dist / math.sqrt(dims)).numpy(), (topk_nearest_neighbour(refs) / math.sqrt(dims)).numpy()
        )
        summary["num_samples"] = int(len(samples))
        summary["num_topk"] = int(len(pool.indices))
        summary["distinct_nearest_topk"] = int(len(set(positions.tolist())))
        summary["label_rule"] = f"class of the nearest top-K image ({self.hparams.label_space}); our choice"
        return summary
