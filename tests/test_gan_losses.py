"""GAN baseline losses and DiffAugment (issue 22), against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffinject.nets.gan_fast import FastDiscriminator
from diffinject.stages.gan_losses import (
    diff_augment,
    distance_consistency_loss,
    hinge_g_loss,
    logistic_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
    random_anchor_layers,
    reconstruction_loss,
    reconstruction_targets,
    soft_hinge_d_fake,
    soft_hinge_d_loss,
    soft_hinge_d_real,
)

# Three latents, source f0 = (1, 0), f1 = (0, 1), f2 = (1, 1); target g0 = g1 = (1, 0), g2 = (0, 1)
SOURCE = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TARGET = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])


def _softmax2(a: float, b: float) -> tuple[float, float]:
    return math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))


def _kl(p: tuple[float, float], q: tuple[float, float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _hand_kl_rows() -> list[float]:
    """KL(P_source ‖ P_target) per anchor, the similarities to the other two written out."""
    c = 1 / math.sqrt(2)  # cos 45°
    # anchor 0: source cos(f0,f1)=0, cos(f0,f2)=c; target cos(g0,g1)=1, cos(g0,g2)=0
    # anchor 1: source cos(f1,f0)=0, cos(f1,f2)=c; target cos(g1,g0)=1, cos(g1,g2)=0
    # anchor 2: source cos(f2,f0)=c, cos(f2,f1)=c; target cos(g2,g0)=0, cos(g2,g1)=0
    source = [_softmax2(0, c), _softmax2(0, c), _softmax2(c, c)]
    target = [_softmax2(1, 0), _softmax2(1, 0), _softmax2(0, 0)]
    return [_kl(p, q) for p, q in zip(source, target, strict=True)]


def test_distance_consistency_matches_the_hand_computation_on_three_latents() -> None:
    rows = _hand_kl_rows()
    assert rows[0] == pytest.approx(0.348676, abs=1e-5) and rows[2] == 0.0
    # "mean" (CDC's nn.KLDivLoss default): pointwise terms averaged over the N(N−1) = 6 entries
    assert distance_consistency_loss(SOURCE, TARGET).item() == pytest.approx(sum(rows) / 6, abs=1e-6)
    assert distance_consistency_loss(SOURCE, TARGET, reduction="batchmean").item() == pytest.approx(
        sum(rows) / 3, abs=1e-6
    )
    # the other direction, KL(target ‖ source), is a different number: the test pins the direction
    c = 1 / math.sqrt(2)
    reverse = 2 * _kl(_softmax2(1, 0), _softmax2(0, c)) / 6
    assert abs(reverse - sum(rows) / 6) > 1e-3
    assert distance_consistency_loss(TARGET, SOURCE).item() != pytest.approx(sum(rows) / 6, abs=1e-4)


def test_distance_consistency_is_zero_for_equal_features_and_ignores_feature_scale() -> None:
    features = [torch.randn(4, 3, 5, 5), torch.randn(4, 2, 8, 8)]
    anchors = [1, 0, 1, 1]
    assert distance_consistency_loss(
        features, [f.clone() for f in features], anchors
    ).item() == pytest.approx(0.0, abs=1e-7)
    # cosine similarity: scaling every target feature leaves the loss at zero
    scaled = [f * 3.0 for f in features]
    assert distance_consistency_loss(features, scaled, anchors).item() == pytest.approx(0.0, abs=1e-6)


def test_distance_consistency_uses_each_anchors_own_layer() -> None:
    # layer 0 holds the hand example; layer 1 is identical in source and target (zero KL rows)
    same = torch.randn(3, 4)
    source, target = [SOURCE, same], [TARGET, same.clone()]
    row0 = _hand_kl_rows()[0]
    assert distance_consistency_loss(source, target, anchor_layers=[0, 1, 1]).item() == pytest.approx(
        row0 / 6, abs=1e-6
    )
    assert distance_consistency_loss(source, target, anchor_layers=[1, 1, 1]).item() == pytest.approx(
        0.0, abs=1e-7
    )
    with pytest.raises(ValueError, match="anchor_layers"):
        distance_consistency_loss(source, target)


def test_distance_consistency_trains_the_target_only() -> None:
    source = torch.randn(4, 8, requires_grad=True)
    target = torch.randn(4, 8, requires_grad=True)
    distance_consistency_loss(source, target).backward()
    assert source.grad is None  # the source generator is the fixed reference
    assert target.grad is not None and target.grad.abs().sum() > 0


def test_distance_consistency_refuses_fewer_than_three_latents() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        distance_consistency_loss(torch.randn(2, 4), torch.randn(2, 4))


def test_random_anchor_layers_never_pick_the_first_map_and_repeat_with_a_seed() -> None:
    layers = random_anchor_layers(7, 200, generator=torch.Generator().manual_seed(3))
    assert set(layers) == set(range(1, 7))
    assert layers == random_anchor_layers(7, 200, generator=torch.Generator().manual_seed(3))


def test_logistic_losses_at_hand_picked_logits() -> None:
    zero = torch.zeros(4)
    assert logistic_d_loss(zero, zero).item() == pytest.approx(2 * math.log(2))
    assert nonsaturating_g_loss(zero).item() == pytest.approx(math.log(2))
    # a confident, correct D: small D loss, large G loss
    assert logistic_d_loss(torch.full((4,), 10.0), torch.full((4,), -10.0)).item() < 1e-4
    assert nonsaturating_g_loss(torch.full((4,), -10.0)).item() == pytest.approx(10.0, abs=1e-3)


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm_and_differentiable() -> None:
    weight = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]]], requires_grad=True)  # D(x) = Σ weight·x
    real = torch.randn(3, 1, 2, 2, requires_grad=True)
    penalty = r1_penalty(real, (real * weight).sum(dim=(1, 2, 3)))
    assert penalty.item() == pytest.approx(1 + 4 + 0.25)
    (grad,) = torch.autograd.grad(penalty, weight)
    assert torch.allclose(grad, 2 * weight)
    with pytest.raises(ValueError, match="requires_grad"):
        r1_penalty(real.detach(), torch.zeros(3))


def test_r1_is_positive_and_trains_a_real_discriminator() -> None:
    torch.manual_seed(0)
    disc = FastDiscriminator(model_size=16, channels=1, width=4, max_width=8)
    real = (torch.rand(2, 1, 16, 16) * 2 - 1).requires_grad_(True)
    penalty = r1_penalty(real, disc(real))
    assert penalty.item() > 0
    penalty.backward()
    assert sum(p.grad.abs().sum() for p in disc.parameters() if p.grad is not None) > 0


def test_soft_hinge_losses_stay_within_their_bounds() -> None:
    gen = torch.Generator().manual_seed(0)
    many = 2000

    def real(value: float) -> float:
        return soft_hinge_d_real(torch.full((many,), value), generator=gen).item()

    def fake(value: float) -> float:
        return soft_hinge_d_fake(torch.full((many,), value), generator=gen).item()

    # real: relu(u − p), u ∈ [0.8, 1)
    assert real(2.0) == 0.0
    assert 0.8 <= real(0.0) < 1.0 and real(0.0) == pytest.approx(0.9, abs=0.01)
    assert 1.8 <= real(-1.0) < 2.0
    assert real(0.9) < 0.1  # only the labels above 0.9 still push
    # fake: relu(u + p)
    assert fake(-2.0) == 0.0
    assert 0.8 <= fake(0.0) < 1.0
    assert 1.3 <= fake(0.5) < 1.5
    total = soft_hinge_d_loss(torch.zeros(many), torch.zeros(many), generator=gen).item()
    assert 1.6 <= total < 2.0
    assert hinge_g_loss(torch.tensor([1.0, -3.0])).item() == pytest.approx(1.0)


def test_soft_hinge_labels_repeat_with_a_seed_and_vary_without() -> None:
    logits = torch.zeros(16)
    first = soft_hinge_d_real(logits, torch.Generator().manual_seed(5))
    assert torch.equal(first, soft_hinge_d_real(logits, torch.Generator().manual_seed(5)))
    assert first != soft_hinge_d_real(logits, torch.Generator().manual_seed(6))


def _left_bar(batch: int = 8, channels: int = 3, size: int = 32) -> torch.Tensor:
    """Model-space images: a white bar on the left quarter, black elsewhere."""
    x = torch.full((batch, channels, size, size), -1.0)
    x[..., : size // 4] = 1.0
    return x


def _brightest_on_the_left(x: torch.Tensor) -> torch.Tensor:
    """Per image: do all the columns holding its brightest pixel lie in the left half?

    Brightness: not the mean, which black fill (translation, cutout) on a brightened background can tip.
    """
    column_max = x.amax(dim=(1, 2))
    brightest = column_max == column_max.amax(dim=1, keepdim=True)
    return ~brightest[:, x.shape[-1] // 2 :].any(dim=1)


def test_diff_augment_keeps_shape_and_gradient_and_repeats_with_a_seed() -> None:
    x = (torch.rand(4, 3, 32, 32) * 2 - 1).requires_grad_(True)
    policy = "color,translation,cutout"
    out = diff_augment(x, policy, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    again = diff_augment(x, policy, generator=torch.Generator().manual_seed(0))
    other = diff_augment(x, policy, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.allclose(out, other)


def test_diff_augment_never_mirrors() -> None:
    x = _left_bar(batch=64)
    assert not _brightest_on_the_left(torch.flip(x, dims=[-1])).any()  # a flip would fail the check
    for seed in range(5):
        out = diff_augment(x, "color,translation,cutout", generator=torch.Generator().manual_seed(seed))
        assert _brightest_on_the_left(out).all()


def test_translation_is_a_whole_pixel_shift_within_an_eighth_of_the_side() -> None:
    x = torch.rand(6, 1, 16, 16)
    out = diff_augment(x, "translation", generator=torch.Generator().manual_seed(2), fill=-1.0)
    padded = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 16 px · 0.125 = 2 px each way
    for i in range(6):
        matches = [
            (dy, dx)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            if torch.equal(out[i], padded[i, :, 2 - dy : 18 - dy, 2 - dx : 18 - dx])
        ]
        assert len(matches) == 1, i


def test_cutout_fills_one_square_and_colour_moves_values() -> None:
    x = torch.ones(8, 3, 16, 16)
    out = diff_augment(x, "cutout", generator=torch.Generator().manual_seed(0))
    cut = (out == -1.0).all(dim=1).sum(dim=(1, 2))
    assert (cut > 0).all() and (cut <= 8 * 8).all()
    assert ((out == 1.0) | (out == -1.0)).all()
    coloured = diff_augment(torch.rand(4, 3, 8, 8), "color", generator=torch.Generator().manual_seed(0))
    assert coloured.shape == (4, 3, 8, 8)
    assert torch.equal(diff_augment(x, ""), x)
    with pytest.raises(ValueError, match="no flip"):
        diff_augment(x, "color,flip")


def test_reconstruction_targets_and_loss() -> None:
    real = torch.arange(16.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    whole, quarter = reconstruction_targets(real, part=1, size=2)
    assert whole[0, 0].tolist() == [[2.5, 4.5], [10.5, 12.5]]  # 2×2 box averages
    assert quarter[0, 0].tolist() == [[2.0, 3.0], [6.0, 7.0]]  # top-right quarter, already 2×2
    assert reconstruction_loss(whole, quarter, real, part=1).item() == 0.0
    assert reconstruction_loss(whole + 1, quarter, real, part=1, kind="mse").item() == pytest.approx(1.0)
    assert reconstruction_loss(whole + 2, quarter - 1, real, part=1, kind="l1").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="reconstruction loss"):
        reconstruction_loss(whole, quarter, real, part=1, kind="lpips")


def test_reconstruction_loss_trains_the_discriminator_decoders() -> None:
    torch.manual_seed(0)
    disc = FastDiscriminator(model_size=32, channels=3, width=4, max_width=16)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    _, whole, quarter = disc.forward_with_reconstruction(real, part=3)
    reconstruction_loss(whole, quarter, real, part=3).backward()
    for decoder in (disc.decode_whole, disc.decode_part):
        assert sum(p.grad.abs().sum() for p in decoder.parameters() if p.grad is not None) > 0
