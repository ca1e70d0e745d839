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


def test_report_names_a_failed_premise_and_the_fallback(tmp_path: Path) -> None:
    from diffinject.report.gate import collect_gate, gate_lines

    def seed(s: int, holds: bool, accepted: int, fallback: str | None) -> None:
        premise = {
            "holds": holds,
            "second_view_follows_style": 0.4 if not holds else 0.7,
            "second_view_follows_content": 0.4 if not holds else 0.2,
            "z": 0.1 if not holds else 8.0,
            "n": 150,
            "min_z": 3.5,
        }
        gate = {"enabled": True, "num_rows": 360, "accepted": accepted, "rejected_not_moved": 100}
        gate.update(content_retention=0.9, content_lost=False, min_confidence=0.9, premise=premise)
        (tmp_path / f"seed{s}/inject").mkdir(parents=True)
        (tmp_path / f"seed{s}/inject/injection_check.json").write_text(json.dumps({"gate": gate}))
        (tmp_path / f"seed{s}/debias").mkdir(parents=True)
        (tmp_path / f"seed{s}/debias/metrics.json").write_text(json.dumps({"fallback": fallback}))

    seed(0, False, 0, "no usable image")
    seed(1, True, 170, None)
    gate = collect_gate(tmp_path, [0, 1])
    assert gate is not None and len(gate["notes"]) == 2  # the premise, and seed 1 kept under half
    assert (
        gate["notes"][0].startswith("PREMISE CHECK FAILED for 1 of 2 seed(s)")
        and "seed 0: 40 % / 40 %" in gate["notes"][0]
    )
    table = "\n".join(gate_lines(gate))
    assert (
        "| 0 | 360 | 0 |" in table and "**fails** | plain ERM |" in table and "holds | DiffInject |" in table
    )
