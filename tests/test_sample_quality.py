"""Generator-quality figures: Fréchet distance, palette closeness, recognition, sampling and the callback."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from diffinject.callbacks import SampleQualityMonitor
from diffinject.data import CMNISTDataModule
from diffinject.data.cmnist import LFF_COLORS
from diffinject.measures import synthetic_set
from diffinject.measures.sample_quality import (
    frechet_distance,
    generator_quality,
    palette_close_rate,
    probe_outputs,
    recognised_rate,
    sample_unconditional,
    split_held_out,
)
from diffinject.stages import P2DiffusionModule
from diffusion_helpers import TinyDataModule, register_tiny_preset


# ---------------------------------------------------------------------------------------------- Fréchet
def test_frechet_of_identical_sets_is_zero() -> None:
    a = np.random.default_rng(0).normal(size=(200, 6)) @ np.random.default_rng(1).normal(size=(6, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a[::-1]) == pytest.approx(0.0, abs=1e-8)


def test_frechet_matches_the_hand_computed_diagonal_case() -> None:
    # Rows ±1 per column, orthogonal columns: sample means μ, covariance diag(4/3 s²) exactly (ddof 1).
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=np.float64)
    a = signs * [1.0, 2.0] + [0.0, 1.0]
    b = signs * [3.0, 0.5] + [2.0, -1.0]
    sd_a, sd_b = np.sqrt(4 / 3) * np.array([1.0, 2.0]), np.sqrt(4 / 3) * np.array([3.0, 0.5])
    expected = (2.0**2 + 2.0**2) + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # 1-D: (μ_a − μ_b)² + (σ_a − σ_b)²
    x = np.array([[-1.0], [1.0]])
    assert frechet_distance(x, 3 * x + 5) == pytest.approx(25 + (np.sqrt(2) - 3 * np.sqrt(2)) ** 2)


def test_frechet_agrees_with_a_general_matrix_square_root() -> None:
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(250, 5)) @ rng.normal(size=(5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_rejects_mismatched_features() -> None:
    with pytest.raises(ValueError, match="N×D"):
        frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))


# ---------------------------------------------------------------------------------------------- colour
def _stroke_images(colours: list[tuple[float, float, float]], size: int = 12) -> np.ndarray:
    """One anti-aliased vertical bar per colour (intensity 1 in the middle, 0.4 at the edges) on black."""
    gray = np.zeros((size, size), dtype=np.float32)
    gray[2:-2, size // 2] = 1.0
    gray[2:-2, size // 2 - 1] = gray[2:-2, size // 2 + 1] = 0.4
    return np.stack([gray[None] * np.asarray(c, dtype=np.float32)[:, None, None] for c in colours])


def test_palette_colours_are_close_and_grey_is_not() -> None:
    palette = [tuple(c) for c in LFF_COLORS]
    assert palette_close_rate(_stroke_images(palette)) == 1.0
    # dimmer strokes of the same colour keep their direction
    assert palette_close_rate(_stroke_images([tuple(0.5 * LFF_COLORS[3])])) == 1.0
    # grey normalises to (1, 1, 1): 0.28 from the nearest palette colour, beyond the 0.083 margin
    grey = _stroke_images([(0.5, 0.5, 0.5)])
    assert synthetic_set.nearest_palette(synthetic_set.foreground_colour(grey))[1][0] == pytest.approx(
        0.283, abs=1e-3
    )
    assert palette_close_rate(grey) == 0.0
    assert palette_close_rate(grey, max_distance=0.3) == 1.0
    # no foreground counts as not close; the rate is over all images
    black = np.zeros((1, 3, 12, 12), dtype=np.float32)
    mixed = np.concatenate([_stroke_images(palette[:2]), grey, black])
    assert palette_close_rate(mixed) == 0.5
    assert palette_close_rate(torch.from_numpy(mixed)) == 0.5


def test_colour_noise_of_the_protocol_stays_close() -> None:
    noisy = np.clip(LFF_COLORS + np.random.default_rng(0).normal(0, 0.005, LFF_COLORS.shape), 0, 1)
    assert palette_close_rate(_stroke_images([tuple(c) for c in noisy])) == 1.0


# ---------------------------------------------------------------------------------------------- shape
def _two_class_probe(sharpness: float = 20.0) -> torch.nn.Sequential:
    """4×4 inputs: hidden = (mean of left half, mean of right half), logits = sharpness · hidden."""
    probe = synthetic_set.build_shape_probe(16, 2, hidden=2)
    left = torch.zeros(4, 4)
    left[:, :2] = 1 / 8
    with torch.no_grad():
        probe[1].weight.copy_(torch.stack([left.flatten(), left.flip(1).flatten()]))
        probe[1].bias.zero_()
        probe[3].weight.copy_(sharpness * torch.eye(2))
        probe[3].bias.zero_()
    return probe


def test_recognised_rate_counts_confident_probe_reads() -> None:
    left, right, both = np.zeros((4, 4)), np.zeros((4, 4)), np.ones((4, 4))
    left[:, :2], right[:, 2:] = 1, 1
    gray = np.stack([left, right, both, both]).astype(np.float32)
    probs, hidden = probe_outputs(_two_class_probe(), gray)
    assert probs.shape == (4, 2) and hidden.shape == (4, 2)
    np.testing.assert_allclose(hidden[0], [1.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(probs[2], [0.5, 0.5], atol=1e-6)
    assert recognised_rate(probs) == 0.5  # the ambiguous images are not recognised
    assert recognised_rate(probs, threshold=0.5) == 1.0
    assert recognised_rate(probe_outputs(_two_class_probe(0.1), gray)[0]) == 0.0  # an unsure probe


def test_split_held_out_is_disjoint_and_capped() -> None:
    keep, held = split_held_out(10, 3, seed=1)
    assert len(held) == 3 and len(keep) == 7 and not set(keep) & set(held)
    assert len(split_held_out(10, 8)[1]) == 5
    np.testing.assert_array_equal(split_held_out(10, 3, seed=1)[1], held)


def test_generator_quality_of_real_images_equals_their_floor() -> None:
    rng = np.random.default_rng(0)
    images = _stroke_images([tuple(LFF_COLORS[i % 10]) for i in range(40)])
    images = images * rng.uniform(0.5, 1.0, (40, 1, 1, 1)).astype(np.float32)
    gray = synthetic_set.shape_gray(images)
    probe = synthetic_set.train_shape_probe(gray[:20], np.arange(20) % 2, num_classes=2, iterations=5)
    figures = generator_quality(images[20:], images[:20], probe, held_out=images[20:])
    assert figures["frechet"] == pytest.approx(figures["frechet_floor"])
    assert figures["recognised"] == figures["real_recognised"]
    assert figures["palette_close"] == figures["real_palette_close"] == 1.0
    grey = generator_quality(_stroke_images([(0.5, 0.5, 0.5)] * 20), images[:20], probe, images[20:])
    assert grey["palette_close"] == 0.0 and grey["real_palette_close"] == 1.0


# ---------------------------------------------------------------------------------------------- sampling
def test_sample_unconditional_is_seeded_in_range_and_restores_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28)
    unet, abar = module.ema_unet.train(), module.alphas_cumprod
    first = sample_unconditional(unet, abar, 3, steps=2, seed=5, image_size=28, batch_size=2)
    assert first.shape == (3, 3, 28, 28) and first.min() >= 0.0 and first.max() <= 1.0
    assert unet.training
    torch.testing.assert_close(first, sample_unconditional(unet, abar, 3, steps=2, seed=5, image_size=28))
    assert not torch.equal(first, sample_unconditional(unet, abar, 3, steps=2, seed=6, image_size=28))
    clipped = sample_unconditional(unet, abar, 3, steps=2, seed=5, clip=True)
    assert clipped.shape == (3, 3, 32, 32) and torch.isfinite(clipped).all()


# ---------------------------------------------------------------------------------------------- callback
def _fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data, monitor, max_steps: int) -> Trainer:
    module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, sample_every_n_epochs=0)
    trainer = Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        callbacks=[monitor],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {t: [(e.step, e.value) for e in events.Scalars(t)] for t in events.Tags()["scalars"]}


def test_monitor_logs_the_figures_every_n_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = CMNISTDataModule(ratio=0.01, source="embedded", batch_size=8, num_workers=0)
    monitor = SampleQualityMonitor(every_n_steps=2, num_samples=8, steps=2, probe_iterations=10)
    trainer = _fit(tmp_path, monkeypatch, data, monitor, max_steps=4)
    scalars = _scalars(Path(trainer.log_dir))
    for key in ("recognised", "palette_close", "frechet"):
        assert [step for step, _ in scalars[f"quality/{key}"]] == [2, 4]  # fit end does not repeat step 4
    assert [step for step, _ in scalars["quality/frechet_floor"]] == [2]  # the floor is logged once
    assert scalars["quality/real_palette_close"][0][1] == 1.0  # real CMNIST colours are on the palette
    assert scalars["quality/frechet"][0][1] > scalars["quality/frechet_floor"][0][1]  # untrained UNet
    result = json.loads((Path(trainer.log_dir) / "sample_quality.json").read_text())
    for key in ("recognised", "palette_close", "frechet"):  # logged = what each evaluation computed
        logged = [value for _, value in scalars[f"quality/{key}"]]
        assert logged == pytest.approx([h[key] for h in result["history"]], rel=1e-6)
    for _, rate in scalars["quality/recognised"] + scalars["quality/palette_close"]:
        assert 8 * rate == pytest.approx(round(8 * rate), abs=1e-5)  # a count out of the 8 samples
    assert result["step"] == 4 and [h["step"] for h in result["history"]] == [2, 4]
    assert result["num_samples"] == result["num_held_out"] == 8
    assert result["num_real"] == len(data.train_eval_dataset) - 8
    assert trainer.lightning_module.ema_unet.training  # the EMA copy's mode is left as it was


def test_monitor_skips_short_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = CMNISTDataModule(ratio=0.01, source="embedded", batch_size=8, num_workers=0)
    monitor = SampleQualityMonitor(every_n_steps=5, num_samples=8, steps=2)
    trainer = _fit(tmp_path, monkeypatch, data, monitor, max_steps=3)
    assert monitor.history == [] and monitor.reference is None  # not even the probe was trained
    assert not (Path(trainer.log_dir) / "sample_quality.json").exists()


def test_monitor_warns_and_does_nothing_off_cmnist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monitor = SampleQualityMonitor(every_n_steps=1, num_samples=4, steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(tmp_path, monkeypatch, TinyDataModule(n=16), monitor, max_steps=2)
    messages = [str(w.message) for w in caught if "SampleQualityMonitor" in str(w.message)]
    assert len(messages) == 1 and "CMNISTDataModule" in messages[0]
    assert monitor.history == [] and "quality/frechet" not in _scalars(Path(trainer.log_dir))
