"""The GAN baselines' networks (issue 22): shapes, value range, the style generator's W API, SLE wiring."""

from __future__ import annotations

import pytest
import torch

from diffinject.nets.gan import check_model_size, feature_widths, quarter_crop
from diffinject.nets.gan_fast import FastDiscriminator, FastGenerator, SkipLayerExcitation
from diffinject.nets.gan_style import StyleDiscriminator, StyleGenerator

TINY_STYLE = {"z_dim": 16, "w_dim": 16, "mapping_layers": 2, "width": 4, "max_width": 16}
TINY_FAST = {"width": 4, "max_width": 16}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _in_model_space(x: torch.Tensor) -> bool:
    return bool(torch.isfinite(x).all() and x.min() >= -1.0 and x.max() <= 1.0)


def test_power_of_two_sizes_only_and_widths_double_per_halving() -> None:
    assert check_model_size(32) == 32
    for bad in (28, 4, 0, 48):
        with pytest.raises(ValueError, match="power of two"):
            check_model_size(bad)
    assert feature_widths(32, width=8, max_width=32) == {4: 32, 8: 32, 16: 16, 32: 8}


def test_quarter_crop_follows_the_documented_quarter_order() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert quarter_crop(x, 0).flatten().tolist() == [0, 1, 4, 5]
    assert quarter_crop(x, 1).flatten().tolist() == [2, 3, 6, 7]  # top-right
    assert quarter_crop(x, 2).flatten().tolist() == [8, 9, 12, 13]  # bottom-left
    assert quarter_crop(x, 3).flatten().tolist() == [10, 11, 14, 15]
    with pytest.raises(ValueError, match="0..3"):
        quarter_crop(x, 4)


def test_style_generator_shapes_range_and_features_at_32px() -> None:
    gen = StyleGenerator(model_size=32, channels=3, **TINY_STYLE)
    z = torch.randn(3, 16)
    images = gen(z)
    assert images.shape == (3, 3, 32, 32) and _in_model_space(images)
    images_again, features = gen.synthesis(gen.mapping(z), return_features=True)
    assert torch.allclose(images_again, images, atol=1e-6)
    # one map per conv: the 4×4 one, then two per resolution 8, 16, 32
    assert gen.num_features == len(features) == 7 and gen.num_ws == 8
    assert [f.shape[-1] for f in features] == [4, 8, 8, 16, 16, 32, 32]
    assert [f.shape[1] for f in features] == [16, 16, 16, 8, 8, 4, 4]


def test_style_generator_w_plus_matches_w_and_each_layer_style_matters() -> None:
    gen = StyleGenerator(model_size=32, channels=1, **TINY_STYLE)
    w = gen.mapping(torch.randn(2, 16))
    w_plus = w[:, None, :].repeat(1, gen.num_ws, 1)
    assert torch.allclose(gen.synthesis(w_plus), gen.synthesis(w), atol=1e-6)
    mixed = w_plus.clone()
    mixed[:, -1] = torch.randn_like(mixed[:, -1])  # only the last toRGB's style
    assert not torch.allclose(gen.synthesis(mixed), gen.synthesis(w), atol=1e-4)
    with pytest.raises(ValueError, match="synthesis expects w"):
        gen.synthesis(torch.randn(2, 5))


def test_mean_w_is_seeded_and_is_the_mapping_mean() -> None:
    gen = StyleGenerator(model_size=32, **TINY_STYLE)
    first = gen.mean_w(512, generator=torch.Generator().manual_seed(1))
    again = gen.mean_w(512, generator=torch.Generator().manual_seed(1))
    assert first.shape == (1, 16) and torch.equal(first, again)
    z = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(first, gen.mapping(z).mean(0, keepdim=True), atol=1e-6)
    assert not first.requires_grad


def test_style_gan_builds_at_larger_sizes_and_runs_at_64() -> None:
    for size, n_features in ((64, 9), (128, 11), (256, 13)):
        gen = StyleGenerator(model_size=size, **{**TINY_STYLE, "width": 1, "max_width": 4})
        assert gen.num_features == n_features
        StyleDiscriminator(model_size=size, width=1, max_width=4)
    gen = StyleGenerator(model_size=64, channels=3, **TINY_STYLE)
    disc = StyleDiscriminator(model_size=64, channels=3, width=4, max_width=16)
    images = gen(torch.randn(2, 16))
    assert images.shape == (2, 3, 64, 64) and _in_model_space(images)
    assert disc(images).shape == (2,)


def test_style_discriminator_gives_one_logit_per_image_and_gradients_reach_the_generator() -> None:
    gen = StyleGenerator(model_size=32, **TINY_STYLE)
    disc = StyleDiscriminator(model_size=32, width=4, max_width=16)
    logits = disc(gen(torch.randn(3, 16)))  # 3 images: the minibatch-std group of 4 does not divide it
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert gen.const.grad is not None and gen.const.grad.abs().sum() > 0
    assert gen.mapping.layers[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="32-px"):
        disc(torch.zeros(1, 3, 28, 28))


def test_minibatch_std_channel_reacts_to_batch_diversity() -> None:
    disc = StyleDiscriminator(model_size=32, width=4, max_width=16, mbstd_group=4)
    same = torch.zeros(4, 3, 32, 32)
    varied = same.clone()
    varied[1:] = torch.rand(3, 3, 32, 32) * 2 - 1
    # image 0 is identical in both batches; only its group mates differ
    assert not torch.allclose(disc(same)[0], disc(varied)[0])
    no_mbstd = StyleDiscriminator(model_size=32, width=4, max_width=16, mbstd_group=0)
    assert torch.allclose(no_mbstd(same)[0], no_mbstd(varied)[0])


def test_fast_generator_shapes_range_and_sle_pairs() -> None:
    gen = FastGenerator(model_size=32, channels=3, nz=8, **TINY_FAST)
    images = gen(torch.randn(2, 8))
    assert images.shape == (2, 3, 32, 32) and _in_model_space(images)
    assert gen.sle_pairs == [(4, 16), (8, 32)]
    assert FastGenerator(model_size=64, nz=8, **TINY_FAST).sle_pairs == [(4, 16), (8, 32), (16, 64)]
    assert FastGenerator(model_size=256, nz=8, width=1, max_width=4).sle_pairs == [
        (4, 64),
        (8, 128),
        (16, 256),
    ]
    big = FastGenerator(model_size=64, channels=1, nz=8, **TINY_FAST)
    assert big(torch.randn(2, 8)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="noise"):
        gen(torch.randn(2, 9))


def test_skip_layer_excitation_gates_channels_by_the_low_resolution_map() -> None:
    sle = SkipLayerExcitation(low_ch=4, high_ch=6)
    low, high = torch.randn(2, 4, 4, 4), torch.randn(2, 6, 16, 16)
    out = sle(low, high)
    assert out.shape == high.shape
    gate = out / high
    # one gate per sample and channel, in (0, 1), constant over the map
    assert torch.allclose(gate, gate[:, :, :1, :1].expand_as(gate), atol=1e-5)
    assert gate.min() > 0 and gate.max() < 1
    assert not torch.allclose(sle(low + torch.randn_like(low), high), out, atol=1e-4)


def test_the_generator_output_depends_on_each_sle_low_resolution_input() -> None:
    gen = FastGenerator(model_size=32, nz=8, **TINY_FAST).eval()
    z = torch.randn(2, 8)
    with torch.no_grad():
        reference = gen(z)
        assert torch.equal(gen(z), reference)  # eval mode: deterministic
        for target in ("16", "32"):
            # perturb only what this SLE reads as its low-res input; the main path stays as it was
            handle = gen.sles[target].register_forward_pre_hook(
                lambda _m, args: (args[0] * 3.0 + 1.0, args[1])
            )
            changed = gen(z)
            handle.remove()
            assert not torch.allclose(changed, reference, atol=1e-5), target


def test_fast_discriminator_logits_and_reconstructions() -> None:
    disc = FastDiscriminator(model_size=32, channels=3, **TINY_FAST)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    logits = disc(real)
    assert logits.shape == (2, 25) and torch.isfinite(logits).all()
    assert disc.rec_size == 16
    logits_again, whole, part = disc.forward_with_reconstruction(real, part=1)
    assert logits_again.shape == (2, 25)
    assert whole.shape == part.shape == (2, 3, 16, 16)
    assert _in_model_space(whole) and _in_model_space(part)
    _, _, other_part = disc.forward_with_reconstruction(real, part=2)
    assert not torch.allclose(part, other_part)  # decoded from a different quarter of the features
    big = FastDiscriminator(model_size=64, channels=1, **TINY_FAST)
    _, whole64, part64 = big.forward_with_reconstruction(torch.zeros(2, 1, 64, 64), part=0)
    assert big(torch.zeros(2, 1, 64, 64)).shape == (2, 25) and whole64.shape == part64.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="32-px"):
        disc(torch.zeros(2, 3, 28, 28))
