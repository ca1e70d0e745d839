"""P2DiffusionModule: the EMA update to the formula, settings refused at construction, broken info files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from diffinject.stages import P2DiffusionModule
from diffinject.stages.diffusion import ema_decay_at
from diffusion_helpers import TinyDataModule, register_tiny_preset
from inject_helpers import tiny_unet, write_unet_export


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_update_ema_is_decay_times_ema_plus_one_minus_decay_times_online(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for ema, online in zip(module.ema_unet.parameters(), module.unet.parameters(), strict=True):
            ema.copy_(torch.randn(ema.shape, generator=g))
            online.copy_(torch.randn(online.shape, generator=g))
    before = [p.detach().clone() for p in module.ema_unet.parameters()]
    online = [p.detach().clone() for p in module.unet.parameters()]
    module.update_ema(0.75)
    for after, old, new in zip(module.ema_unet.parameters(), before, online, strict=True):
        torch.testing.assert_close(after, 0.75 * old + 0.25 * new, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(p, q) for p, q in zip(module.unet.parameters(), online, strict=True))


def test_each_optimizer_step_folds_the_online_weights_in_with_the_scheduled_decay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Trainer.fit: step n uses d_n = ema_decay_at(n); ema_n = d_n·ema_{n−1} + (1 − d_n)·online_n."""
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, sample_every_n_epochs=0)
    original = module.update_ema
    records: list[tuple[float, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = []

    def recording(decay: float) -> None:
        ema_before = [p.detach().clone() for p in module.ema_unet.parameters()]
        online = [p.detach().clone() for p in module.unet.parameters()]
        original(decay)
        records.append(
            (decay, ema_before, online, [p.detach().clone() for p in module.ema_unet.parameters()])
        )

    monkeypatch.setattr(module, "update_ema", recording)
    trainer = Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=3, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(module, TinyDataModule(n=16))
    assert [r[0] for r in records] == [ema_decay_at(n, 0.9999) for n in (1, 2, 3)]
    assert [r[0] for r in records] == pytest.approx([2 / 11, 3 / 12, 4 / 13])
    for decay, ema_before, online, ema_after in records:
        for old, new, after in zip(ema_before, online, ema_after, strict=True):
            torch.testing.assert_close(after, decay * old + (1 - decay) * new, rtol=1e-5, atol=1e-6)
    assert int(module.ema_updates) == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 0}, "num_samples must be >= 1 for the sample grids"),
        ({"num_samples": -2, "sample_every_n_epochs": 0}, "num_samples must be >= 1"),
        ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"betas": (0.9, 1.0)}, r"betas must be two values in \[0, 1\)"),
        ({"p2_gamma": -1.0}, "p2 gamma must be >= 0"),
        ({"image_size": 0}, "image_size and in_channels must be >= 1"),
    ],
)
def test_meaningless_training_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        P2DiffusionModule(register_tiny_preset(monkeypatch), **{"image_size": 28, **kwargs})


def test_zero_samples_without_grids_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    P2DiffusionModule(
        register_tiny_preset(monkeypatch), image_size=28, num_samples=0, sample_every_n_epochs=0
    )


def test_init_from_with_a_broken_info_file_names_it(tmp_path: Path) -> None:
    export = tmp_path / "unet"
    write_unet_export(tiny_unet(16), export, image_size=16)
    broken = tmp_path / "broken"
    shutil.copytree(export, broken)
    (broken / "diffusion_info.json").write_text('{"num_train_timesteps": 1000,')  # truncated copy
    with pytest.raises(
        ValueError, match=r"broken/diffusion_info\.json is not valid JSON .*expected the JSON"
    ):
        P2DiffusionModule(init_from=str(broken), image_size=16)
