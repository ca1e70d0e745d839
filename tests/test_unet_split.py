"""The encoder/decoder split of UNet2DModel must reproduce the plain forward exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from diffinject.diffusion import check_split_supported, unet_decode, unet_encode


def _tiny_unet(**overrides: object) -> UNet2DModel:
    kwargs: dict[str, object] = {
        "sample_size": 16,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "attention_head_dim": 8,
    }
    kwargs.update(overrides)
    torch.manual_seed(0)
    return UNet2DModel(**kwargs).eval()


# The blocks a converted ADM (P2 / ILVR) checkpoint uses: residual up/down-sampling, attention levels that
# down/up-sample with a resnet, scale-shift time conditioning, a GroupNorm'd mid attention, learned variance.
ADM_LIKE = {
    "out_channels": 6,
    "down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    "block_out_channels": (8, 16, 16),
    "downsample_type": "resnet",
    "upsample_type": "resnet",
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 4,
}


@pytest.mark.parametrize(
    ("overrides", "h_shape"),
    [
        ({}, (3, 16, 8, 8)),
        ({"layers_per_block": 2, "center_input_sample": True}, (3, 16, 8, 8)),
        ({"time_embedding_type": "fourier", "flip_sin_to_cos": False}, (3, 16, 8, 8)),
        (ADM_LIKE, (3, 16, 4, 4)),
        ({**ADM_LIKE, "layers_per_block": 2, "resnet_time_scale_shift": "default"}, (3, 16, 4, 4)),
    ],
    ids=["attn+plain", "two-layers-centered", "fourier", "adm-resnet-updown", "adm-two-layers-default-norm"],
)
def test_split_equals_forward(overrides: dict[str, object], h_shape: tuple[int, ...]) -> None:
    unet = _tiny_unet(**overrides)
    x = torch.randn(3, 3, 16, 16)
    t = torch.tensor([5, 400, 999])
    with torch.no_grad():
        expected = unet(x, t).sample
        encoding = unet_encode(unet, x, t)
        got = unet_decode(unet, encoding)
    assert encoding.h.shape == h_shape
    assert got.shape == (3, unet.config.out_channels, 16, 16)
    assert torch.equal(got, expected)


def test_split_decodes_two_h_in_one_batch() -> None:
    unet = _tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([300, 300])
    with torch.no_grad():
        encoding = unet_encode(unet, x, t)
        other_h = torch.randn_like(encoding.h)
        both = unet_decode(unet, encoding.repeat(2), torch.cat([encoding.h, other_h]))
        alone = unet_decode(unet, encoding, other_h)
    torch.testing.assert_close(both[2:], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[:2], unet(x, t).sample, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="repeat"):
        unet_decode(unet, encoding, torch.cat([encoding.h, other_h]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {
                "down_block_types": ("SkipDownBlock2D", "DownBlock2D"),
                "up_block_types": ("UpBlock2D", "SkipUpBlock2D"),
            },
            "down block 0 is SkipDownBlock2D",
        ),
        ({"num_class_embeds": 4}, "class-conditional"),
    ],
)
def test_unsupported_configs_fail_clearly(overrides: dict[str, object], match: str) -> None:
    try:
        unet = _tiny_unet(**overrides)
    except Exception as err:  # pragma: no cover - a diffusers version that cannot build the config at all
        pytest.skip(f"diffusers cannot build this config: {err}")
    with pytest.raises(ValueError, match=match):
        check_split_supported(unet)
    with pytest.raises(ValueError, match="UNet2DModel only"):
        check_split_supported(torch.nn.Linear(2, 2))
