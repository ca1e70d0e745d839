"""P2DiffusionModule: loss, training, EMA, sampling, export and checkpoint resume on tiny CPU runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from diffinject.diffusion import to_model_space
from diffinject.nets.unet import load_unet_export
from diffinject.stages import P2DiffusionModule
from diffusion_helpers import TinyDataModule, cmnist_like, register_tiny_preset


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Two OpenMP threads per process stall badly (7x here) when other processes share the 2 cores.
    torch.set_num_threads(1)


def _trainer(tmp_path: Path, max_steps: int, **kwargs) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        **kwargs,
    )


def test_p2_loss_is_the_weighted_eps_mse(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = register_tiny_preset(monkeypatch)
    torch.manual_seed(0)
    module = P2DiffusionModule(tiny, image_size=28, p2_gamma=1.0, p2_k=1.0)
    x0 = to_model_space(cmnist_like(4)[0], 32)
    t, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 32, 32)
    abar = module.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad():
        loss = module.p2_loss(x0, t, noise)
        eps = module.unet(abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t).sample
    per_sample = (eps - noise).pow(2).mean(dim=(1, 2, 3))
    expected = ((1 - abar.flatten()) * per_sample).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = P2DiffusionModule(tiny, image_size=28, p2_gamma=0.0)
    plain.unet.load_state_dict(module.unet.state_dict())
    with torch.no_grad():
        assert plain.p2_loss(x0, t, noise).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_training_loss_decreases_on_cmnist_like_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, p2_gamma=0.0)
    optimizer = torch.optim.AdamW(module.unet.parameters(), lr=5e-3)
    images = to_model_space(cmnist_like(16)[0], 32)
    timesteps = torch.tensor([50, 200, 400, 600, 800, 950, 300, 700])  # a fixed timestep set
    g = torch.Generator().manual_seed(1)
    noises = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    losses = []
    for step in range(20):
        half = step % 2
        loss = module.p2_loss(images[half * 8 : half * 8 + 8], timesteps, noises[half])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not decrease enough: first {first:.4f}, last {last:.4f}"


def test_fit_updates_ema_samples_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    export = tmp_path / "diffusion" / "unet"
    module = P2DiffusionModule(
        register_tiny_preset(monkeypatch),
        image_size=28,
        export_dir=str(export),
        sample_every_n_epochs=0,
        lr=1e-3,
    )
    initial = [p.detach().clone() for p in module.ema_unet.parameters()]
    _trainer(tmp_path, max_steps=3, enable_checkpointing=False).fit(module, TinyDataModule(n=16))
    ema, online = list(module.ema_unet.parameters()), list(module.unet.parameters())
    assert all(not p.requires_grad for p in ema)
    assert any(not torch.equal(a, b) for a, b in zip(ema, initial, strict=True)), "EMA never moved"
    assert any(not torch.equal(a, b) for a, b in zip(ema, online, strict=True)), "EMA is a plain copy"
    assert module.bottleneck is module.unet.mid_block

    unet, info = load_unet_export(export)
    assert info["global_step"] == 3 and info["image_size"] == 28 and info["model_size"] == 32
    assert info["preprocess"] == "pad-black-or-resize" and info["unet_preset"] == "test-tiny"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 900])
    with torch.no_grad():
        assert torch.equal(unet.eval()(x, t).sample, module.ema_unet.eval()(x, t).sample)

    a = module.sample(num_samples=3, num_steps=5, seed=7)
    b = module.sample(num_samples=3, num_steps=5, seed=7)
    assert a.shape == (3, 3, 28, 28) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_channels_last_and_bf16_autocast_train_step() -> None:
    torch.manual_seed(0)
    module = P2DiffusionModule("cmnist-small", image_size=28, channels_last=True)
    module.setup("fit")
    assert module.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    batch = {"image": cmnist_like(4)[0]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x0 = module.model_inputs(batch)
        loss = module.p2_loss(x0, torch.tensor([1, 2, 3, 4]), torch.randn_like(x0))
    assert x0.is_contiguous(memory_format=torch.channels_last)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert module.unet.conv_in.weight.grad is not None
    with pytest.raises(TypeError, match="'image' key"):
        module.model_inputs(torch.zeros(2, 3, 28, 28))


class _RecordStart(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.step = trainer.global_step
        self.ema = {k: v.detach().clone() for k, v in pl_module.ema_unet.state_dict().items()}


def test_checkpoint_resume_keeps_step_and_ema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = register_tiny_preset(monkeypatch)
    ckpt_dir = tmp_path / "checkpoints"

    def checkpoint() -> ModelCheckpoint:
        return ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True, save_top_k=1)

    first = P2DiffusionModule(tiny, image_size=28, sample_every_n_epochs=0)
    _trainer(tmp_path, max_steps=4, callbacks=[checkpoint()]).fit(first, TinyDataModule(n=16))
    assert (ckpt_dir / "last.ckpt").is_file()
    saved_ema = {k: v.detach().clone() for k, v in first.ema_unet.state_dict().items()}

    torch.manual_seed(123)  # a different fresh initialisation: everything must come from the checkpoint
    resumed = P2DiffusionModule(tiny, image_size=28, sample_every_n_epochs=0)
    record = _RecordStart()
    trainer = _trainer(tmp_path, max_steps=6, callbacks=[checkpoint(), record])
    trainer.fit(resumed, TinyDataModule(n=16), ckpt_path="last")
    assert record.step == 4
    assert all(torch.equal(record.ema[k], saved_ema[k]) for k in saved_ema)
    assert trainer.global_step == 6
    assert any(not torch.equal(resumed.ema_unet.state_dict()[k], saved_ema[k]) for k in saved_ema)


def test_rejects_mismatched_data_and_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lr_schedule"):
        P2DiffusionModule("cmnist-small", lr_schedule="step")
    with pytest.raises(ValueError, match="must divide"):
        P2DiffusionModule("cmnist-small", sample_steps=30)
    module = P2DiffusionModule("cmnist-small", image_size=32)
    with pytest.raises(ValueError, match="image_size=32 does not match the data module's image_size=28"):
        _trainer(tmp_path, max_steps=1).fit(module, TinyDataModule())


def test_compile_option_keeps_checkpoint_keys() -> None:
    plain = P2DiffusionModule("cmnist-small", image_size=28)
    compiled = P2DiffusionModule("cmnist-small", image_size=28, compile=True)
    assert type(compiled._eps_model()).__name__ == "OptimizedModule"  # torch.compile is lazy: no compile here
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    assert {name for name, _ in compiled.named_children()} == {"unet", "ema_unet"}


def test_bf16_mixed_with_fused_adamw_and_clipping_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Lightning's AMP plugin alone raises for clipping + fused optimisers; the module clips itself.
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, sample_every_n_epochs=0)
    trainer = _trainer(tmp_path, max_steps=2, precision="bf16-mixed", enable_checkpointing=False)
    trainer.fit(module, TinyDataModule(n=16))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True


def test_gradient_clipping_bounds_the_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28)
    optimizer = module.configure_optimizers()["optimizer"]
    for p in module.unet.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.unet.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)
    module.configure_gradient_clipping(optimizer, gradient_clip_val=1e-5, gradient_clip_algorithm="value")
    assert max(p.grad.abs().max().item() for p in module.unet.parameters()) <= 1e-5


def test_validation_loss_uses_ema_and_is_reproducible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, sample_every_n_epochs=0)
    trainer = _trainer(tmp_path, max_steps=2, enable_checkpointing=False)
    trainer.fit(module, TinyDataModule(n=16))
    first = trainer.validate(module, TinyDataModule(n=16), verbose=False)[0]["val/loss"]
    assert trainer.validate(module, TinyDataModule(n=16), verbose=False)[0]["val/loss"] == first
    module.ema_unet.load_state_dict(module.unet.state_dict())  # the online weights give another value
    assert trainer.validate(module, TinyDataModule(n=16), verbose=False)[0]["val/loss"] != first
