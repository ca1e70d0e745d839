"""`SyntheticImageWriter`: PNGs + manifest of the injection stage, resumable, independent of device count.

Layout under `output_dir`: `images/{index}.png` (each written to a temp file and renamed, so a file that
exists is complete), per-rank shards `manifest.rank{r}.csv` (a row is appended only after its PNG is in
place, flushed per batch), and, after a barrier, `manifest.csv` merged by rank 0: rows deduplicated by
index, kept only if their PNG exists, sorted by index, written atomically; the shards are then removed.

Resuming: a sample is done when its PNG exists (atomic writes make that proof enough). At setup rank 0
collects those indices and broadcasts them, and the data module leaves them out of the predict loader, so
a rerun only computes the missing samples; rows lost with a shard are rebuilt from the pairing at merge.
`settings.json` records the generation settings and `pairs.csv` the pairing (every sample's content,
style, labels and noise seed); a rerun with other settings or another pairing fails instead of mixing two
different synthetic sets in one folder (a larger `ratio` only appends samples: pairs are per-sample seeded).
The settings include the sha256 of the UNet's weights (`unet_weights_sha256`), so a UNet retrained to the
same step count is refused too; a folder written before the fingerprint existed is resumed with a warning
(nothing to compare) and the fingerprint recorded. The effective `micro_batch` is recorded as well; a
change only warns (pixels of new samples may differ from the old ones by rounding, ≤ 1/255 measured).
Temporary files a kill left behind (`.{name}.tmp*` of PNGs, manifests, settings) are removed at setup.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image

from diffinject.stages.image_grid import log_image_grid

MANIFEST_COLUMNS = (
    "index",
    "content_index",
    "style_index",
    "label",
    "content_label",
    "style_label",
    "content_bias",
    "style_bias",
    "path",
)
SHARD_GLOB = "manifest.rank*.csv"
PAIR_COLUMNS = (*MANIFEST_COLUMNS[:-1], "noise_seed")
#: temp files of `save_png_atomic`, `write_manifest_atomic` and settings.json: ".{name}.tmp{pid}"
TEMP_NAME = re.compile(r"^\..+\.tmp\d*$")
#: settings whose change does not refuse a resume: the pixels of new samples move by rounding only
TOLERATED = ("micro_batch",)
#: settings older versions did not record: a folder without them is resumed with a warning
RECORDED_LATER = ("unet_weights_sha256", "micro_batch")


def fsync_dir(folder: Path) -> None:
    """Make the renames into `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_png_atomic(image: torch.Tensor, path: Path) -> None:
    """uint8 C×H×W (C = 1 or 3) → PNG at `path`, via a temp file + rename (never a partial PNG).

    The temp file is fsynced before the rename: otherwise a power loss can leave the new name pointing at
    a file whose data never reached the disk (an empty PNG that resuming counts as done). The writer fsyncs
    the folder once per batch (`fsync_dir`), before the batch's manifest rows.
    """
    array = image.numpy()
    if array.shape[0] == 1:
        pil = Image.fromarray(array[0], mode="L")
    elif array.shape[0] == 3:
        pil = Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    else:
        raise ValueError(f"cannot write a {array.shape[0]}-channel image as PNG: {path}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("wb") as handle:
        pil.save(handle, format="PNG")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def remove_temp_files(output_dir: Path) -> int:
    """Delete the temp files a killed run left in `output_dir` and `output_dir/images`; returns the count.

    Only names of the writers' own pattern are touched; at setup no rank of this run is writing yet.
    """
    removed = 0
    for folder in (output_dir, output_dir / "images"):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if TEMP_NAME.match(path.name) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def read_rows(path: Path, columns: Sequence[str] = MANIFEST_COLUMNS) -> list[dict[str, str]]:
    """Rows of a manifest, shard or pairs file (a torn last line from a crash is dropped)."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [r for r in rows if all(r.get(c) not in (None, "") for c in columns)]


def collect_rows(output_dir: Path) -> dict[int, dict[str, str]]:
    """index → row for every sample with a manifest/shard row whose PNG exists (later shards win)."""
    rows: dict[int, dict[str, str]] = {}
    sources = [output_dir / "manifest.csv", *sorted(output_dir.glob(SHARD_GLOB))]
    for source in sources:
        for row in read_rows(source):
            if (output_dir / row["path"]).is_file():
                rows[int(row["index"])] = row
    return rows


def finished_indices(output_dir: Path, num_samples: int) -> list[int]:
    """Sample indices < num_samples whose PNG exists."""
    return [i for i in range(num_samples) if (output_dir / "images" / f"{i}.png").is_file()]


def write_manifest_atomic(
    path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = MANIFEST_COLUMNS
) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


class SyntheticImageWriter(BasePredictionWriter):
    """Write `InjectionPredictModule` outputs as `images/{index}.png` + `manifest.csv` (see module doc).

    Args:
        output_dir: stage folder, e.g. runs/cmnist/1pct/inject.
        grid_samples: (style, content, synthetic) triples logged as one TensorBoard grid (0: none).
    """

    def __init__(self, output_dir: str, grid_samples: int = 8) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.grid_samples = grid_samples
        self._shard: Any = None
        self._grid_logged = False

    @property
    def images_dir(self) -> Path:
        return self.output_dir / "images"

    # ---------------------------------------------------------------------------------------------- setup
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "skip_samples") or not hasattr(datamodule, "plan"):
            raise TypeError(
                "SyntheticImageWriter needs the InjectionPairsDataModule (data.class_path: "
                f"InjectionPairsDataModule), got {type(datamodule).__name__}"
            )
        done: list[int] = []
        error = ""
        total = len(datamodule.plan)
        if trainer.is_global_zero:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_temp_files(self.output_dir)
            if removed:
                rank_zero_info(
                    f"SyntheticImageWriter: removed {removed} temp files left by an interrupted run"
                )
            try:
                self._check_settings(self._settings(trainer, pl_module))
                self._check_pairs(datamodule)
                done = finished_indices(self.output_dir, total)
            except ValueError as err:
                error = str(err)
        done, error = trainer.strategy.broadcast((done, error), src=0)
        if error:
            raise ValueError(error)
        datamodule.skip_samples(done)
        rank_zero_info(f"SyntheticImageWriter: {len(done)}/{total} samples already in {self.output_dir}")
        self._grid_logged = False

    @staticmethod
    def _settings(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        hparams = dict(getattr(pl_module, "hparams", {}))
        # implementation choices that give the same images are not settings
        same_output = ("channels_last", "shared_encoder", "cache_content", "content_cache_mb", "micro_batch")
        settings = {k: v for k, v in hparams.items() if k not in same_output}
        settings["unet_global_step"] = getattr(pl_module, "info", {}).get("global_step")
        settings["unet_weights_sha256"] = getattr(pl_module, "unet_sha256", None)
        settings["micro_batch"] = getattr(pl_module, "chunk_size", None)  # the effective one
        return json.loads(json.dumps(settings, default=str))

    def _check_settings(self, settings: dict[str, Any]) -> None:
        path = self.output_dir / "settings.json"
        if path.is_file() and any(self.images_dir.glob("*.png")):
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(
                    f"{path} is not valid JSON ({error}): the settings of the images in {self.output_dir} "
                    "are unknown; use another output_dir or delete this one"
                ) from error
            self._compare_settings(old, settings)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)

    def _compare_settings(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Refuse a resume under other settings (weights first, they are the likeliest silent change)."""
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        unrecorded = [k for k in changed if k in RECORDED_LATER and k not in old]
        tolerated = [k for k in changed if k in TOLERATED and k in old]
        strict = [k for k in changed if k not in unrecorded and k not in tolerated]
        key = "unet_weights_sha256"
        if key in strict:
            was, now = str(old.get(key))[:16], str(new.get(key))[:16]
            steps = f"step {old.get('unet_global_step')} → {new.get('unet_global_step')}"
            raise ValueError(
                f"{self.output_dir} holds synthetic images made from other UNet weights: {new.get('unet')} "
                f"now has sha256 {now}…, the images were made with {was}… (retrained or replaced; {steps}); "
                "use another output_dir or delete this one to regenerate the set"
            )
        if strict:
            raise ValueError(
                f"{self.output_dir} holds synthetic images made with other settings ({', '.join(strict)}: "
                f"{[old.get(k) for k in strict]} → {[new.get(k) for k in strict]}); use another "
                "output_dir or delete this one"
            )
        if unrecorded:
            rank_zero_warn(
                f"{self.output_dir}/settings.json predates {', '.join(unrecorded)}: the images already there "
                "cannot be checked against the current UNet / batching; resuming and recording them now"
            )
        if tolerated:
            rank_zero_warn(
                f"{self.output_dir}: micro_batch {old.get('micro_batch')} → {new.get('micro_batch')}; new "
                "samples may differ from the existing ones by rounding (≤ 1/255 measured); set "
                f"model.init_args.micro_batch: {old.get('micro_batch')} to keep every image reproducible"
            )

    def _check_pairs(self, datamodule: Any) -> None:
        """Compare the pairing with the one recorded in `pairs.csv` (and manifest rows), then record it."""
        total = len(datamodule.plan)
        current = [datamodule.sample_info(i) for i in range(total)]
        recorded = read_rows(self.output_dir / "pairs.csv", PAIR_COLUMNS)
        recorded += list(collect_rows(self.output_dir).values())
        keys = ("content_index", "style_index", "label")
        for row in recorded:
            index = int(row["index"])
            if index >= total:
                if (self.output_dir / "images" / f"{index}.png").is_file():
                    raise ValueError(
                        f"{self.output_dir} holds sample {index} but this run makes {total} samples (ratio "
                        "lowered?); use another output_dir or delete this one"
                    )
                continue
            if any(int(row[k]) != current[index][k] for k in keys):
                raise ValueError(
                    f"{self.output_dir}: sample {index} was made from another pairing (seed, top-K, K, style "
                    "pool or label rule changed); use another output_dir or delete this one"
                )
        write_manifest_atomic(self.output_dir / "pairs.csv", current, PAIR_COLUMNS)

    def _open_shard(self, rank: int) -> Any:
        if self._shard is None:
            shard = self.output_dir / f"manifest.rank{rank}.csv"
            new = not shard.is_file() or shard.stat().st_size == 0
            self._shard = shard.open("a", newline="", encoding="utf-8")
            if new:
                csv.writer(self._shard).writerow(MANIFEST_COLUMNS)
        return self._shard

    # ---------------------------------------------------------------------------------------------- write
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        indices = [int(i) for i in prediction["index"]]
        images = prediction["images"]
        rows = []
        for b, index in enumerate(indices):
            relative = f"images/{index}.png"
            save_png_atomic(images[b], self.output_dir / relative)
            rows.append(
                {
                    "index": index,
                    "content_index": int(batch["content_index"][b]),
                    "style_index": int(batch["style_index"][b]),
                    "label": int(batch["label"][b]),
                    "content_label": int(batch["content_label"][b]),
                    "style_label": int(batch["style_label"][b]),
                    "content_bias": int(batch["content_bias"][b]),
                    "style_bias": int(batch["style_bias"][b]),
                    "path": relative,
                }
            )
        fsync_dir(self.images_dir)  # the renames are durable before the rows that name them
        shard = self._open_shard(trainer.global_rank)
        csv.DictWriter(shard, fieldnames=MANIFEST_COLUMNS).writerows(rows)
        shard.flush()
        os.fsync(shard.fileno())
        if trainer.is_global_zero and not self._grid_logged and self.grid_samples > 0:
            self._log_grid(trainer, batch, images)

    def _log_grid(self, trainer: Trainer, batch: Any, images: torch.Tensor) -> None:
        n = min(self.grid_samples, images.shape[0])
        triples = torch.stack(
            [
                batch["style_image"][:n].float().cpu(),
                batch["content_image"][:n].float().cpu(),
                images[:n].float() / 255.0,
            ],
            dim=1,
        ).flatten(0, 1)  # rows: style | content | synthetic
        self._grid_logged = log_image_grid(
            trainer.loggers, "inject/style_content_synthetic", triples, 0, nrow=3
        )

    # ---------------------------------------------------------------------------------------------- merge
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # teardown, not on_predict_end: a rank whose loader is empty (everything done) skips the predict
        # loop and its end hooks, but every rank reaches teardown, so the barriers always pair up.
        if stage != "predict":
            return
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        trainer.strategy.barrier("synthetic_writer_merge")
        if trainer.is_global_zero:
            self.merge(len(trainer.datamodule.plan), trainer.datamodule.sample_info)
        trainer.strategy.barrier("synthetic_writer_merged")

    def merge(self, expected: int, sample_info: Callable[[int], dict[str, Any]] | None = None) -> list[dict]:
        """Fold the shards into `manifest.csv` (dedupe, drop rows without a PNG) and delete the shards.

        With `sample_info`, a PNG whose row was lost (shard deleted) gets its row rebuilt from the pairing.
        """
        rows: dict[int, dict[str, Any]] = dict(collect_rows(self.output_dir))
        if sample_info is not None:
            for index in finished_indices(self.output_dir, expected):
                if index not in rows:
                    rows[index] = {**sample_info(index), "path": f"images/{index}.png"}
        ordered = [rows[i] for i in sorted(rows)]
        write_manifest_atomic(self.output_dir / "manifest.csv", ordered)
        for shard in self.output_dir.glob(SHARD_GLOB):
            shard.unlink()
        missing = expected - len(ordered)
        if missing > 0:
            rank_zero_warn(
                f"SyntheticImageWriter: {missing} of {expected} samples still missing in {self.output_dir}; "
                "rerun the same command to complete the set"
            )
        else:
            rank_zero_info(f"SyntheticImageWriter: complete set of {expected} samples in {self.output_dir}")
        return ordered
