"""An inject set the gate rejected whole: the empty accepted manifest is read as a decision, and the debias
stage trains plain ERM on the real images and says so (metrics.json `fallback`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from diffinject.callbacks.synthetic_writer import MANIFEST_COLUMNS
from diffinject.data import CMNISTDataModule
from diffinject.stages import DebiasClassifier, LfFClassifier

ARGS = {"arch": "mlp", "num_classes": 10, "in_channels": 3, "image_size": 28}


def _empty_manifest(folder: Path, name: str = "manifest_accepted.csv", accepted: int | None = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerow(MANIFEST_COLUMNS)
    if accepted is not None:
        (folder / "injection_check.json").write_text(json.dumps({"gate": {"accepted": accepted}}))
    return path


def _data(tmp_path: Path, manifest: Path) -> CMNISTDataModule:
    return CMNISTDataModule(
        root=str(tmp_path / "data"), source="embedded", batch_size=512, synthetic_manifest=str(manifest)
    )


@pytest.mark.parametrize("name,accepted", [("manifest.csv", 0), ("manifest_accepted.csv", None)])
def test_an_unexplained_empty_manifest_is_still_an_error(
    tmp_path: Path, name: str, accepted: int | None
) -> None:
    data = _data(tmp_path, _empty_manifest(tmp_path / "inject", name, accepted))
    with pytest.raises(ValueError, match="has a header but no rows"):
        data.setup("fit")


@pytest.mark.parametrize("module", [LfFClassifier, DebiasClassifier])
def test_debias_falls_back_to_plain_erm_when_the_gate_accepted_nothing(tmp_path: Path, module: type) -> None:
    torch.manual_seed(0)
    data = _data(tmp_path, _empty_manifest(tmp_path / "inject"))
    model = module(**ARGS, if_no_synthetic="erm")
    trainer = Trainer(
        default_root_dir=str(tmp_path / "debias"),
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match="trains plain ERM on the real images"):
        trainer.fit(model, datamodule=data)
    assert model.fallback and len(data.train_dataset) == data.num_train_original
    trainer.test(model, datamodule=data, ckpt_path=str(tmp_path / "debias/checkpoints/best.ckpt"))
    metrics = json.loads((tmp_path / "debias/metrics.json").read_text())
    assert "no usable image" in metrics["fallback"]
    if module is LfFClassifier:  # the bias branch never trained: only the ERM branch moved
        assert all(p.grad is None or not p.grad.any() for p in model.net_b.parameters())


def test_if_no_synthetic_is_checked() -> None:
    with pytest.raises(ValueError, match="if_no_synthetic"):
        LfFClassifier(**ARGS, if_no_synthetic="maybe")
    with pytest.raises(ValueError, match="if_no_synthetic"):
        DebiasClassifier(**ARGS, if_no_synthetic="maybe")
