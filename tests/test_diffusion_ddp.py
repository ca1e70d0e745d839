"""Two-process CPU DDP (gloo) smoke run of the diffusion stage: trains, keeps ranks in sync, exports once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from diffinject.nets.unet import load_unet_export
from diffinject.stages import P2DiffusionModule
from diffusion_helpers import TinyDataModule


@pytest.mark.slow
def test_ddp_spawn_two_cpu_processes(tmp_path: Path) -> None:
    export = tmp_path / "diffusion" / "unet"
    module = P2DiffusionModule(
        "cmnist-small",
        image_size=28,
        export_dir=str(export),
        sample_every_n_epochs=1,
        num_samples=4,
        sample_steps=5,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",  # gloo on CPU; spawn keeps pytest out of the launcher's re-exec
        max_steps=3,
        gradient_clip_val=1.0,
        logger=TensorBoardLogger(tmp_path, name="diffusion", version=""),
        callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, TinyDataModule(n=32, batch_size=4))  # state lives in the spawned ranks: read files

    unet, info = load_unet_export(export)
    assert info["global_step"] == 3
    checkpoint = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3
    assert int(checkpoint["state_dict"]["ema_updates"]) == 3
    ema_state = {
        k.removeprefix("ema_unet."): v
        for k, v in checkpoint["state_dict"].items()
        if k.startswith("ema_unet.")
    }
    exported = unet.state_dict()
    assert all(torch.equal(exported[k], ema_state[k]) for k in exported)
    assert list((tmp_path / "diffusion").glob("events.out.tfevents.*")), "rank 0 wrote no TensorBoard events"
