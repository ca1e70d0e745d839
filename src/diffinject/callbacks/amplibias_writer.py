"""`AmpliBiasWriter`: PNGs + manifest of `AmpliBiasGenerate`, resumable, plus the memorisation figure.

The same files and guarantees as `SyntheticImageWriter` (whose helpers and settings check it reuses):
`images/{index}.png` written atomically, per-rank shards merged by rank 0 into `manifest.csv` (deduplicated by
index, rows without a PNG dropped, sorted), `settings.json` refusing a resume under other settings (the
generator's weights sha256, sampling seed, ratio, top-K file and label rule). What differs: a sample's
row depends on its pixels (the label rule), not on a precomputed pairing, so a PNG whose row was lost is
re-labelled from the PNG itself (`AmpliBiasGenerate.label_rows` reads the 8-bit image, exactly what was
labelled), and there is no `pairs.csv`. After the merge `memorisation.json` records how close the samples
sit to the top-K (`stages.amplibias_generate.memorisation_summary`) and the label counts.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from diffinject.callbacks.synthetic_writer import (
    MANIFEST_COLUMNS,
    SyntheticImageWriter,
    finished_indices,
    fsync_dir,
    remove_temp_files,
    save_png_atomic,
)
from diffinject.data.tempdirs import write_json_atomic
from diffinject.nets.fingerprint import file_sha256
from diffinject.stages.image_grid import log_image_grid

MEMORISATION_FILE = "memorisation.json"


def read_png(path: Any) -> torch.Tensor:
    """A written sample back as uint8 C×H×W (the writer saves 1-channel as L, 3-channel as RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())


class AmpliBiasWriter(SyntheticImageWriter):
    """Write `AmpliBiasGenerate` outputs as `images/{index}.png` + `manifest.csv` + `memorisation.json`.

    Args:
        output_dir: stage folder, e.g. runs/cmnist/1pct/amplibias_generate.
        grid_samples: (nearest top-K image, sample) pairs logged as one TensorBoard grid (0: none).
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        datamodule = trainer.datamodule
        if (
            datamodule is None
            or not hasattr(datamodule, "skip_samples")
            or getattr(datamodule, "plan", None) is None
        ):
            raise TypeError(
                "AmpliBiasWriter needs data.class_path: "
                f"diffinject.data.topk_images.GeneratorSamplesDataModule, got {type(datamodule).__name__}"
            )
        total = len(datamodule.plan)
        done: list[int] = []
        error = ""
        if trainer.is_global_zero:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            removed = remove_temp_files(self.output_dir)
            if removed:
                rank_zero_info(f"AmpliBiasWriter: removed {removed} temp files left by an interrupted run")
            try:
                self._check_settings(self._generation_settings(datamodule, pl_module))
                beyond = [
                    p.name for p in self.images_dir.glob("*.png") if p.stem.isdigit() and int(p.stem) >= total
                ]
                if beyond:
                    raise ValueError(
                        f"{self.output_dir} holds sample(s) {sorted(beyond)[:3]} beyond the {total} this run "
                        "makes (ratio lowered?); use another output_dir or delete this one"
                    )
                done = finished_indices(self.output_dir, total)
            except ValueError as err:
                error = str(err)
        done, error = trainer.strategy.broadcast((done, error), src=0)
        if error:
            raise ValueError(error)
        datamodule.skip_samples(done)
        rank_zero_info(f"AmpliBiasWriter: {len(done)}/{total} samples already in {self.output_dir}")
        self._grid_logged = False

    @staticmethod
    def _generation_settings(datamodule: Any, pl_module: LightningModule) -> dict[str, Any]:
        """What decides a sample's pixels or row; a changed `micro_batch` only warns (rounding)."""
        settings = {
            **dict(pl_module.hparams),
            "generator_weights_sha256": pl_module.weights_sha256,
            "generator_global_step": pl_module.info.get("global_step"),
            "ratio": float(datamodule.ratio),
            "seed": int(datamodule.seed),
            "k": datamodule.k,
            "k_source": datamodule.k_source,
            "topk_sha256": file_sha256(datamodule.topk_path),
            "num_train": int(datamodule.pool.num_train),
        }
        return json.loads(json.dumps(settings, default=str))  # as settings.json reads back (tuples → lists)

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
        rows = [{**row, "path": f"images/{row['index']}.png"} for row in prediction["rows"]]
        for row, image in zip(rows, prediction["images"], strict=True):
            save_png_atomic(image, self.output_dir / row["path"])
        fsync_dir(self.images_dir)  # the renames are durable before the rows that name them
        shard = self._open_shard(trainer.global_rank)
        csv.DictWriter(shard, fieldnames=MANIFEST_COLUMNS).writerows(rows)
        shard.flush()
        os.fsync(shard.fileno())
        if trainer.is_global_zero and not self._grid_logged and self.grid_samples > 0:
            n = min(self.grid_samples, len(rows))
            pool = pl_module.pool
            where = {int(i): p for p, i in enumerate(pool.indices)}
            nearest = pool.images[[where[int(r["content_index"])] for r in rows[:n]]]
            pairs = torch.stack([nearest, prediction["images"][:n].float() / 255.0], dim=1).flatten(0, 1)
            self._grid_logged = log_image_grid(
                trainer.loggers, "amplibias/nearest_topk_sample", pairs, 0, nrow=2
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self._shard is not None:
            self._shard.close()
            self._shard = None
        trainer.strategy.barrier("amplibias_writer_merge")
        if trainer.is_global_zero:
            self.finish(len(trainer.datamodule.plan), pl_module)
        trainer.strategy.barrier("amplibias_writer_merged")

    def finish(self, expected: int, pl_module: LightningModule) -> list[dict[str, Any]]:
        """Merge the manifest (lost rows re-labelled from their PNGs), then write memorisation.json."""

        def relabel(index: int) -> dict[str, Any]:
            return pl_module.label_rows([index], read_png(self.images_dir / f"{index}.png")[None])[0]

        rows = self.merge(expected, relabel)
        if rows:
            images = torch.stack([read_png(self.output_dir / row["path"]) for row in rows])
            summary = pl_module.memorisation(images)
            summary["label_counts"] = dict(sorted(Counter(int(r["label"]) for r in rows).items()))
            summary["complete"] = len(rows) == expected
            write_json_atomic(self.output_dir / MEMORISATION_FILE, summary)
        return rows
