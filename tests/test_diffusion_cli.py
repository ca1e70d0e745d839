"""The diffusion stage through the CLI with the shipped configs (paths redirected into tmp_path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffinject.cli import main
from diffinject.nets.unet import load_unet_export


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Two OpenMP threads per process stall badly (7x here) when other processes share the 2 cores.
    torch.set_num_threads(1)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*/diffusion*.yaml"))


def _redirect(config: Path, tmp_path: Path) -> Path:
    """Copy a shipped config with every `runs/...` path moved under tmp_path."""
    text = config.read_text().replace("runs/", f"{tmp_path}/runs/")
    out = tmp_path / config.name
    out.write_text(text)
    return out


def _fit(config: Path, tmp_path: Path, *extra: str):
    return main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer",
            str(CONFIGS / "trainer" / "cpu.yaml"),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--data.init_args.root",
            str(tmp_path / "data"),
            "--data.init_args.batch_size",
            "16",
            "--model.init_args.num_samples",
            "4",
            "--model.init_args.sample_steps",
            "5",
            *extra,
        ]
    )


def test_shipped_diffusion_configs_are_consistent() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in SHIPPED}
    assert {"cmnist/diffusion.yaml", "cmnist/diffusion_paper.yaml", "ccifar10/diffusion.yaml"} <= names
    assert {"bffhq/diffusion.yaml", "dogscats/diffusion.yaml"} <= names
    for path in SHIPPED:
        cfg = yaml.safe_load(path.read_text())
        args = cfg["model"]["init_args"]
        run = cfg["trainer"]["default_root_dir"]
        assert cfg["model"]["class_path"] == "P2DiffusionModule", path
        assert args["export_dir"] == f"{run}/unet", path
        assert cfg["trainer"]["callbacks"][0]["init_args"]["dirpath"] == f"{run}/checkpoints", path
        assert cfg["trainer"]["gradient_clip_val"] == 1.0, path
        logger = cfg["trainer"]["logger"]["init_args"]
        assert f"{logger['save_dir']}/{logger['name']}" == run, path


def test_cli_fit_writes_unet_grid_and_resumes(tmp_path: Path) -> None:
    config = _redirect(CONFIGS / "cmnist" / "diffusion.yaml", tmp_path)
    run = tmp_path / "runs" / "cmnist" / "1pct" / "diffusion"
    cli = _fit(config, tmp_path, "--trainer.max_steps", "3")
    assert cli.trainer.global_step == 3
    unet, info = load_unet_export(run / "unet")
    assert info["global_step"] == 3 and info["unet_preset"] == "cmnist-small" and info["image_size"] == 28
    assert unet.config.sample_size == 28 and info["model_size"] == 28  # native 28 px, no padding
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()

    events = sorted(run.glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events[-1]), size_guidance={"images": 0})
    accumulator.Reload()
    assert "samples/ema_ddim" in accumulator.Tags()["images"]
    assert accumulator.Images("samples/ema_ddim")[-1].step == 3

    resumed = _fit(config, tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert resumed.trainer.global_step == 5
    assert int(resumed.model.ema_updates) == 5
    assert load_unet_export(run / "unet")[1]["global_step"] == 5


@pytest.mark.slow
def test_paper_config_trains_a_step_on_cpu(tmp_path: Path) -> None:
    config = _redirect(CONFIGS / "cmnist" / "diffusion_paper.yaml", tmp_path)
    cli = _fit(config, tmp_path, "--trainer.max_steps", "1", "--data.init_args.num_workers", "0")
    assert cli.trainer.global_step == 1
    _, info = load_unet_export(tmp_path / "runs" / "cmnist" / "1pct" / "diffusion" / "unet")
    assert info["unet_preset"] == "cmnist-paper"
