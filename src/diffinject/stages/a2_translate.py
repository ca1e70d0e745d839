"""A² step 3 (issue 22): translate label-free pseudo-aligned training images with the adapted generator.

`A2TranslateDataModule` picks N = round(`ratio` × |train|) training images that are (a) not in the seed's
top-K and (b) classified correctly by the seed's bias model with probability ≥ `min_confidence`: what the
bias model finds easy is most likely bias-aligned. Only class labels are read for that; bias labels never
choose anything (they are copied into the manifest's `content_bias` column for the report, as the inject
stage does). The pick is deterministic for a seed: every training image gets a priority from
`numpy.random.default_rng(seed)`, and the N eligible images of lowest priority are taken in that order, so
a larger ratio appends samples.

`A2Translate` inverts each image into the *source* generator's W (`a2_inversion.invert`, from the mean w),
renders the same w with the *adapted* generator (both share W: the adaptation keeps the mapping frozen), and
maps the result back to data space; label = the translated image's class. Outputs go through the
inject stage's `SyntheticImageWriter` (`images/{index}.png` + `manifest.csv` with `index, content_index,
style_index (-1), label, …, path`; atomic, resumable, refused under other settings or another selection):
this module offers what it reads (`plan`, `sample_info`, `skip_samples`; `info`, `unet_sha256`,
`chunk_size`). Every inversion runs at one fixed batch shape (`micro_batch`, last chunk padded), so a
resumed run makes the same pixels. Per batch, the mean initial and final inversion losses are appended to
`inversion_losses.csv` and logged; `translate_info.json` sums up the selection and the losses; the first
batch of a run logs a TensorBoard grid (source image | source-G reconstruction | translation).
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from diffinject.data.base import BiasedDataModule
from diffinject.data.pairs import check_scores, read_scores
from diffinject.data.tempdirs import write_json_atomic
from diffinject.diffusion.preprocess import from_model_space, to_model_space
from diffinject.nets.gan_style import StyleGenerator
from diffinject.stages.a2_adapt import dataset_labels
from diffinject.stages.a2_inversion import invert, penultimate_features
from diffinject.stages.gan_export import GAN_INFO, fit_hint, load_gan_export
from diffinject.stages.image_grid import log_image_grid
from diffinject.stages.weights import load_classifier_checkpoint

LOSS_COLUMNS = ("first_index", "last_index", "num_images", "loss_initial", "loss_final")


@torch.no_grad()
def class_probabilities(net: torch.nn.Module, dataset: Dataset, batch_size: int = 512) -> np.ndarray:
    """N×classes softmax of `net` over a dataset's images, in index order (CPU, eval mode)."""
    net.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return torch.cat([net(b["image"].float()).softmax(dim=1) for b in loader]).numpy()


def pseudo_aligned(
    probs: np.ndarray, labels: np.ndarray, exclude: np.ndarray, min_confidence: float
) -> np.ndarray:
    """Indices the bias model gets right with p(label) ≥ min_confidence, outside `exclude` (the top-K)."""
    p_label = probs[np.arange(len(labels)), labels]
    eligible = (probs.argmax(axis=1) == labels) & (p_label >= min_confidence)
    eligible[exclude] = False
    return np.flatnonzero(eligible)


def pick(eligible: np.ndarray, num_train: int, n: int, seed: int) -> np.ndarray:
    """The n eligible indices of lowest seeded priority, in priority order (a prefix of a larger pick)."""
    priority = np.random.default_rng(seed).random(num_train)
    return eligible[np.argsort(priority[eligible], kind="stable")][:n]


class _Translations(Dataset):
    def __init__(self, owner: A2TranslateDataModule, sample_ids: list[int]) -> None:
        self.owner, self.sample_ids = owner, sample_ids

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, position: int) -> dict[str, Any]:
        info = self.owner.sample_info(self.sample_ids[position])
        assert self.owner.source is not None
        return {**info, "content_image": self.owner.source[info["content_index"]]["image"]}


class A2TranslateDataModule(LightningDataModule):
    """Predict data of A²'s translation: the picked pseudo-aligned images (module docstring).

    Args:
        data: the dataset module (its `train_eval_dataset`: training split, no augmentation, index order).
        topk: the seed's `bias/topk.csv` (its images are never translated).
        bias_model: the seed's bias-stage checkpoint (`bias/checkpoints/best.ckpt`).
        ratio: N = round(ratio × |train|) translations (the ratio knob; the official code translates all).
        min_confidence: the bias model's p(label) an image needs to count as pseudo-aligned.
        seed: the pick's seed (the pipeline passes the run's seed).
        batch_size, num_workers: predict loader; score_batch_size: batch of the bias-model pass.
    """

    def __init__(
        self,
        data: BiasedDataModule,
        topk: str,
        bias_model: str,
        ratio: float = 0.1,
        min_confidence: float = 0.9,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        score_batch_size: int = 512,
    ) -> None:
        super().__init__()
        if not ratio > 0:
            raise ValueError(f"ratio must be > 0 (N = round(ratio × |train|)), got {ratio}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        if batch_size < 1 or score_batch_size < 1 or num_workers < 0:
            raise ValueError(f"need batch sizes >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
        self.data, self.topk_path, self.bias_model = data, Path(topk), bias_model
        self.ratio, self.min_confidence, self.seed = ratio, min_confidence, seed
        self.batch_size, self.num_workers, self.score_batch_size = batch_size, num_workers, score_batch_size
        self.name, self.pct = data.name, data.pct
        self.num_classes, self.image_size, self.channels = data.num_classes, data.image_size, data.channels
        self.source: Dataset | None = None
        self.plan: np.ndarray | None = None  # sample i translates training image plan[i]
        self.labels = np.zeros(0, dtype=np.int64)
        self.biases = np.zeros(0, dtype=np.int64)
        self.selection: dict[str, Any] = {}
        self.done: set[int] = set()

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.plan is not None:
            return
        self.data.setup("fit")
        source = self.data.train_eval_dataset
        if source is None:
            raise RuntimeError(f"{type(self.data).__name__}.setup('fit') did not build train_eval_dataset")
        self.source, self.labels = source, dataset_labels(source)
        num_train = len(self.labels)
        biases = getattr(source, "biases", None)  # reporting only (manifest column), never for the pick
        self.biases = np.full(num_train, -1, np.int64) if biases is None else np.asarray(biases, np.int64)
        scores = read_scores(self.topk_path)
        check_scores(scores, self.labels)
        net, _ = load_classifier_checkpoint(self.bias_model, expect={"num_classes": self.num_classes})
        probs = class_probabilities(net, source, self.score_batch_size)
        eligible = pseudo_aligned(probs, self.labels, scores.indices, self.min_confidence)
        n = int(round(self.ratio * num_train))
        if n < 1:
            raise ValueError(f"ratio={self.ratio} × {num_train} training images gives no translation")
        if eligible.size == 0:
            raise ValueError(
                f"no training image outside {self.topk_path} is classified correctly by {self.bias_model} "
                f"with p >= {self.min_confidence}: nothing to translate (lower min_confidence?)"
            )
        if eligible.size < n:
            rank_zero_warn(
                f"only {eligible.size} pseudo-aligned images (p >= {self.min_confidence}, outside the top-K) "
                f"for N = {n} translations: translating all {eligible.size}"
            )
        self.plan = pick(eligible, num_train, n, self.seed)
        self.selection = {
            "num_train": num_train, "topk_rows": len(scores.indices), "eligible": int(eligible.size),
            "requested": n, "translated": len(self.plan), "ratio": self.ratio,
            "min_confidence": self.min_confidence, "seed": self.seed, "topk": str(self.topk_path),
            "bias_model": str(self.bias_model),
        }  # fmt: skip
        rank_zero_info(f"A² translation: {len(self.plan)} of {eligible.size} pseudo-aligned images (N = {n})")

    def sample_info(self, i: int) -> dict[str, int]:
        """Sample i's manifest fields but the path: its training image, class, and -1 for the absent style."""
        if self.plan is None:
            raise RuntimeError("A2TranslateDataModule: call setup() first")
        c = int(self.plan[i])
        label = int(self.labels[c])
        return {
            "index": i, "content_index": c, "style_index": -1, "label": label, "content_label": label,
            "style_label": -1, "content_bias": int(self.biases[c]), "style_bias": -1, "noise_seed": 0,
        }  # fmt: skip

    def skip_samples(self, done: Any) -> None:
        """Leave these sample indices out of the loader (their PNGs exist: an earlier run made them)."""
        self.done = {int(i) for i in done}

    def predict_dataloader(self) -> DataLoader:
        if self.plan is None:
            raise RuntimeError("A2TranslateDataModule: call setup('predict') first")
        todo = [i for i in range(len(self.plan)) if i not in self.done]
        return DataLoader(
            _Translations(self, todo), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )


class A2Translate(LightningModule):
    """Predict-only: pseudo-aligned images in, their translations by the adapted generator out (uint8).

    Args:
        source: the source stage's export (`a2_source/generator`): its W is where images are inverted.
        adapted: the seed's adaptation export (`a2_adapt/generator`), made from that same source.
        inversion_steps, inversion_lr: Adam steps and peak lr per image (A²'s projector: 1000-3000, 0.1).
        w_plus: one w per layer (W+) instead of one per image (W).
        lr_rampup, lr_rampdown: fractions of the run for the projector's lr ramps.
        bias_model, feature_weight: add feature_weight × the L2 between the bias model's penultimate
            features of the rendering and the image (0: pixels only; a stand-in for the projector's LPIPS).
        mean_w_samples: latents averaged for the start w (fixed seed 0).
        micro_batch: images per inversion (fixed shape; None: the loader's batch_size).
        grid_samples: (image, reconstruction, translation) triples in the TensorBoard grid (0: none).
        output_dir: where inversion_losses.csv and translate_info.json go (None: the default_root_dir).
    """

    def __init__(
        self,
        source: str,
        adapted: str,
        inversion_steps: int = 100,
        inversion_lr: float = 0.05,
        w_plus: bool = False,
        lr_rampup: float = 0.05,
        lr_rampdown: float = 0.25,
        bias_model: str | None = None,
        feature_weight: float = 0.0,
        mean_w_samples: int = 4096,
        micro_batch: int | None = None,
        grid_samples: int = 8,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if inversion_steps < 1 or not inversion_lr > 0 or mean_w_samples < 1 or grid_samples < 0:
            raise ValueError(
                "need inversion_steps >= 1, inversion_lr > 0, mean_w_samples >= 1, grid_samples >= 0"
            )
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 (None: the loader's batch size), got {micro_batch}")
        if feature_weight < 0 or (feature_weight > 0 and bias_model is None):
            raise ValueError(
                f"feature_weight={feature_weight} needs feature_weight >= 0 and, if > 0, a bias_model"
            )
        src = load_gan_export(source, StyleGenerator, fit_hint(source, "a2_source"), ("a2_source",))
        same = dict(src.info["generator_args"])  # the adaptation keeps the architecture (and W)
        adp = load_gan_export(adapted, StyleGenerator, fit_hint(adapted, "a2_adapt"), ("a2_adapt",), same)
        recorded = (adp.info.get("source") or {}).get("generator_sha256")
        if recorded is not None and recorded != src.generator_sha256:
            raise ValueError(
                f"{Path(adapted) / GAN_INFO}: adapted from a source generator with sha256 "
                f"{recorded[:16]}…, but {source} holds {src.generator_sha256[:16]}… (retrained?); "
                "rerun the adaptation"
            )
        self.source_generator, self.adapted_generator = src.generator, adp.generator
        self.source_info, self.adapted_info = src.info, adp.info
        self.model_size = int(src.info["model_size"])
        seeded = torch.Generator().manual_seed(0)
        self.register_buffer(
            "start_w", src.generator.mean_w(mean_w_samples, generator=seeded), persistent=False
        )
        #: read by SyntheticImageWriter's settings record: a rerun with other generators is refused
        self.info = {"global_step": adp.info.get("global_step")}
        self.unet_sha256 = hashlib.sha256(
            f"{src.generator_sha256}:{adp.generator_sha256}".encode()
        ).hexdigest()
        self.bias_net: torch.nn.Module | None = None
        if feature_weight > 0 and bias_model is not None:
            net, _ = load_classifier_checkpoint(bias_model, expect={})
            self.bias_net = net.eval().requires_grad_(False)
        self._grid_logged = False

    @property
    def chunk_size(self) -> int | None:
        """Images per inversion: `micro_batch`, else the data module's batch_size."""
        if self.hparams.micro_batch is not None:
            return int(self.hparams.micro_batch)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        size = getattr(datamodule, "batch_size", None)
        return int(size) if size is not None else None

    @property
    def output_path(self) -> Path:
        return Path(self.hparams.output_dir or self.trainer.default_root_dir)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if not hasattr(datamodule, "plan") or not hasattr(datamodule, "selection"):
            raise TypeError(
                f"A2Translate needs A2TranslateDataModule as its data, got {type(datamodule).__name__}"
            )
        info_file = Path(self.hparams.source) / GAN_INFO
        for key in ("channels", "image_size"):
            theirs = getattr(datamodule, key, None)
            if theirs is not None and int(theirs) != int(self.source_info[key]):
                raise ValueError(
                    f"{info_file}: {key}={self.source_info[key]}, the data module serves {theirs}"
                )
        for callback in self.trainer.callbacks:
            if int(getattr(callback, "grid_samples", 0) or 0) > 0:
                raise ValueError(
                    f"{type(callback).__name__}(grid_samples > 0) expects style images; set its "
                    "grid_samples: 0 (A2Translate logs its own grid: model.init_args.grid_samples)"
                )
        self._grid_logged = False

    def translate(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """[0, 1] images → (translations, source-G reconstructions) in [0, 1] at the data size, and losses."""
        hp = self.hparams
        n, size = images.shape[0], images.shape[-1]
        chunk = self.chunk_size or n
        feature_fn = penultimate_features(self.bias_net, size) if self.bias_net is not None else None
        out, recon, initial, final = [], [], [], []
        for start in range(0, n, chunk):
            rows = list(range(start, min(start + chunk, n)))
            padded = rows + [start] * (chunk - len(rows))
            targets = to_model_space(images[padded].float(), self.model_size)
            with torch.autocast(device_type=self.device.type, enabled=False):
                result = invert(
                    self.source_generator, targets, self.start_w, hp.inversion_steps, hp.inversion_lr,
                    w_plus=hp.w_plus, feature_fn=feature_fn, feature_weight=hp.feature_weight,
                    rampup=hp.lr_rampup, rampdown=hp.lr_rampdown,
                )  # fmt: skip
                with torch.no_grad():
                    out.append(self.adapted_generator.synthesis(result.w)[: len(rows)])
                    recon.append(self.source_generator.synthesis(result.w)[: len(rows)])
            initial.append(result.loss_initial[: len(rows)])
            final.append(result.loss_final[: len(rows)])
        losses = {
            "loss_initial": float(torch.cat(initial).mean()),
            "loss_final": float(torch.cat(final).mean()),
        }
        back = (
            from_model_space(torch.cat(out).float(), size),
            from_model_space(torch.cat(recon).float(), size),
        )
        return back[0], back[1], losses

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        images = batch["content_image"].float()
        translated, reconstructed, losses = self.translate(images)
        indices = [int(i) for i in batch["index"]]
        self._record(indices, losses, batch_idx)
        if self.trainer.is_global_zero and not self._grid_logged and self.hparams.grid_samples > 0:
            k = min(self.hparams.grid_samples, images.shape[0])
            triples = torch.stack([images[:k].cpu(), reconstructed[:k].cpu(), translated[:k].cpu()], dim=1)
            self._grid_logged = log_image_grid(
                self.trainer.loggers, "a2/image_reconstruction_translation", triples.flatten(0, 1), 0, nrow=3
            )
        return {"index": batch["index"].cpu(), "images": (translated * 255.0).round().to(torch.uint8).cpu()}

    def _record(self, indices: list[int], losses: dict[str, float], batch_idx: int) -> None:
        """Append the batch's mean losses to inversion_losses.csv (one write: appends do not interleave)."""
        path = self.output_path / "inversion_losses.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        header = "" if path.is_file() and path.stat().st_size > 0 else ",".join(LOSS_COLUMNS) + "\n"
        values = (min(indices), max(indices), len(indices), losses["loss_initial"], losses["loss_final"])
        line = ",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values) + "\n"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(header + line)
        step = min(indices)
        for logger in self.trainer.loggers:
            logger.log_metrics({f"a2_translate/inversion_{k}": v for k, v in losses.items()}, step=step)

    def teardown(self, stage: str) -> None:
        # teardown, not on_predict_end: a rerun with nothing left skips the loop but still records the summary
        if stage != "predict" or self._trainer is None or not self.trainer.is_global_zero:
            return
        rows = read_loss_rows(self.output_path / "inversion_losses.csv")
        weights = np.array([r["num_images"] for r in rows], dtype=np.float64)
        summary: dict[str, Any] = {"batches": len(rows), "images": int(weights.sum())}
        if rows:
            for key in ("loss_initial", "loss_final"):
                summary[f"mean_{key}"] = float(np.average([r[key] for r in rows], weights=weights))
        payload = {
            "selection": dict(getattr(self.trainer.datamodule, "selection", {})),
            "inversion": summary,
            "source": {"path": str(self.hparams.source), "global_step": self.source_info.get("global_step")},
            "adapted": {
                "path": str(self.hparams.adapted),
                "global_step": self.adapted_info.get("global_step"),
            },
        }
        write_json_atomic(self.output_path / "translate_info.json", payload)


def read_loss_rows(path: Path) -> list[dict[str, float]]:
    """Rows of inversion_losses.csv (a torn last line from a kill is skipped)."""
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                rows.append({k: float(row[k]) for k in LOSS_COLUMNS})
            except (TypeError, ValueError, KeyError):
                continue
    return rows
