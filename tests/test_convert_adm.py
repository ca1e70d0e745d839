"""ADM (guided-diffusion / P2 / ILVR) checkpoint → diffusers export: exact outputs, strict mapping, safety.

A tiny ADM (`adm_reference.ADMReference`, our own re-implementation with ADM's parameter names) gets random
values in *every* parameter (ADM zero-initialises its output convs, which would hide mapping errors), is saved
with `torch.save` and converted through the CLI; the converted UNet must reproduce all output channels and
the bottleneck h to float precision.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from adm_reference import ADMReference, randomize_
from diffinject.convert import (
    ADM_PRESETS,
    ADMConfig,
    ADMConversionError,
    convert_state_dict,
    diffusers_config,
)
from diffinject.convert.checkpoint import build_converted_unet, load_adm_state_dict, unwrap_state_dict
from diffinject.convert.cli import build_parser, config_from_args, main
from diffinject.diffusion import unet_decode, unet_encode
from diffinject.nets.unet import load_unet_export
from inject_helpers import write_topk

# 32 px, channels 32/32/64, attention at 16 px (2 heads of 16) and 8 px + mid (4 heads), learned sigma,
# residual up/down-sampling, scale-shift norm: every block kind of the P2 models, in miniature.
SMALL = ADMConfig(
    image_size=32,
    num_channels=32,
    channel_mult=(1, 1, 2),
    num_res_blocks=1,
    attention_resolutions=(16, 8),
    num_head_channels=16,
)
SMALL_FLAGS = "--image-size 32 --num-channels 32 --channel-mult 1,1,2 --num-res-blocks 1 "
SMALL_FLAGS += "--attention-resolutions 16,8 --num-head-channels 16"
# the MODEL_FLAGS of the P2 README's sampling command, pasted as they are
P2_README_FLAGS = (
    "--attention_resolutions 16 --class_cond False --diffusion_steps 1000 --dropout 0.0 --image_size 256 "
    "--learn_sigma True --noise_schedule linear --num_channels 128 --num_res_blocks 1 --num_head_channels 64 "
    "--resblock_updown True --use_fp16 False --use_scale_shift_norm True"
)
WRITER = "diffinject.callbacks.SyntheticImageWriter"
TIMESTEPS = [torch.tensor([0, 1, 2, 3]), torch.tensor([999, 500, 250, 17])]


class _NotATensor:
    """A custom class: unpickling it needs more than weights_only allows."""


def _reference(cfg: ADMConfig, seed: int = 0) -> ADMReference:
    torch.manual_seed(seed)
    return randomize_(ADMReference(cfg), seed).eval()


def _assert_matches(unet: torch.nn.Module, ref: ADMReference, size: int = 32) -> None:
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    for t in TIMESTEPS:
        with torch.no_grad():
            expected, h = ref.forward_with_h(x, t)
            got = unet(x, t).sample
            encoding = unet_encode(unet, x, t)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(encoding.h, h, rtol=1e-5, atol=1e-5)
        assert torch.equal(unet_decode(unet, encoding), got)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[ADMReference, Path, Path]:
    root = tmp_path_factory.mktemp("adm")
    ref = _reference(SMALL)
    ckpt = root / "ema_0.9999_123000.pt"
    torch.save(ref.state_dict(), ckpt)
    assert main(["adm", str(ckpt), "--out", str(root / "export"), *SMALL_FLAGS.split()]) == 0
    return ref, ckpt, root / "export"


def test_cli_export_reproduces_reference_outputs_and_h(converted: tuple[ADMReference, Path, Path]) -> None:
    ref, ckpt, export = converted
    unet, info = load_unet_export(export)
    assert unet.config.out_channels == 6 and unet.config.resnet_time_scale_shift == "scale_shift"
    _assert_matches(unet, ref)
    assert info["source"] == "adm" and info["weights"] == "converted"
    assert info["source_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert info["global_step"] == 123000  # from guided-diffusion's ema_<rate>_<step>.pt name
    assert (info["image_size"], info["model_size"], info["in_channels"], info["out_channels"]) == (
        32,
        32,
        3,
        6,
    )
    assert info["learned_variance"] is True and info["prediction_type"] == "epsilon"
    assert (info["num_train_timesteps"], info["beta_start"], info["beta_end"]) == (1000, 1e-4, 0.02)
    assert info["adm"]["channel_mult"] == [1, 1, 2] and info["adm"]["rescale_timesteps"] is False


@pytest.mark.parametrize(
    "cfg",
    [
        replace(SMALL, use_new_attention_order=True),
        replace(
            SMALL,
            channel_mult=(1, 2, 2),
            num_res_blocks=2,
            num_head_channels=-1,
            num_heads=2,
            learn_sigma=False,
            use_scale_shift_norm=False,
            resblock_updown=False,
        ),  # fmt: skip
    ],
    ids=["new-attention-order", "conv-resample-additive-norm-fixed-heads"],
)
def test_other_adm_variants_match(cfg: ADMConfig) -> None:
    ref = _reference(cfg, seed=3)
    _assert_matches(build_converted_unet(ref.state_dict(), cfg), ref)


def test_legacy_qkv_reorder_matters() -> None:
    """Splitting the legacy [head][q|k|v][d] rows as if they were [q|k|v][head][d] changes the output."""
    ref = _reference(SMALL)
    wrong = build_converted_unet(ref.state_dict(), replace(SMALL, use_new_attention_order=True))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 700])
    with torch.no_grad():
        assert (wrong(x, t).sample - ref(x, t)).abs().max() > 1e-2


def test_p2_architecture_maps_key_for_key() -> None:
    """The full 256 px P2 UNet (on the meta device): every ADM key consumed, every parameter filled."""
    cfg = ADM_PRESETS["p2-ffhq"]
    with torch.device("meta"):
        ref = ADMReference(cfg)
        from diffusers import UNet2DModel

        unet = UNet2DModel(**diffusers_config(cfg))
    state = convert_state_dict(ref.state_dict(), cfg, unet)
    assert set(state) == set(unet.state_dict())
    count = sum(p.numel() for p in ref.parameters())
    assert count == sum(p.numel() for p in unet.parameters())
    assert 93e6 < count < 94e6  # P2: "lightweight ADM, 93M params"
    assert unet.config.down_block_types[4] == "AttnDownBlock2D" and unet.config.attention_head_dim == 64


def test_readme_flags_parse_to_the_p2_preset() -> None:
    args = build_parser().parse_args(["adm", "x.pt", "--out", "o", *P2_README_FLAGS.split()])
    assert config_from_args(args) == ADM_PRESETS["p2-ffhq"] == ADMConfig()
    args = build_parser().parse_args(
        ["adm", "x.pt", "--out", "o", "--no-learn-sigma", "--channel-mult", "1,2"]
    )
    assert config_from_args(args) == replace(ADMConfig(), learn_sigma=False, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="class-conditional"):
        config_from_args(build_parser().parse_args(["adm", "x.pt", "--out", "o", "--class_cond", "True"]))


def test_mismatched_checkpoints_name_keys_and_shapes() -> None:
    ref = _reference(SMALL)
    unet = build_converted_unet(ref.state_dict(), SMALL)
    state = ref.state_dict()
    missing = {k: v for k, v in state.items() if k != "middle_block.1.qkv.weight"}
    with pytest.raises(
        ADMConversionError, match=r"missing ADM keys \(1\): middle_block\.1\.qkv\.weight \(192, 64, 1\)"
    ):
        convert_state_dict(missing, SMALL, unet)
    extra = {**state, "label_emb.weight": torch.zeros(10, 128)}
    with pytest.raises(
        ADMConversionError, match=r"class-conditional.*unexpected ADM keys \(1\): label_emb\.weight"
    ):
        convert_state_dict(extra, SMALL, unet)
    wrong = {**state, "out.2.weight": torch.zeros(3, 32, 3, 3)}
    with pytest.raises(
        ADMConversionError, match=r"out\.2\.weight: checkpoint \(3, 32, 3, 3\), expected \(6, 32, 3, 3\)"
    ):
        convert_state_dict(wrong, SMALL, unet)
    with pytest.raises(ADMConversionError, match="channel_mult\\[0\\] must be 1"):
        diffusers_config(replace(SMALL, channel_mult=(2, 2)))
    with pytest.raises(ADMConversionError, match="head widths"):
        diffusers_config(replace(SMALL, num_head_channels=-1, num_heads=2))


def test_cli_reports_a_mismatch(converted: tuple[ADMReference, Path, Path], tmp_path: Path, capsys) -> None:
    _, ckpt, _ = converted
    code = main(["adm", str(ckpt), "--out", str(tmp_path / "x"), *SMALL_FLAGS.split(), "--no-learn-sigma"])
    assert code == 2
    err = capsys.readouterr().err
    assert "out.2.weight: checkpoint (6, 32, 3, 3), expected (3, 32, 3, 3)" in err
    assert not (tmp_path / "x").exists()
    assert main(["adm", str(ckpt), "--out", str(converted[2]), *SMALL_FLAGS.split()]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_weights_only_loading_refuses_custom_objects(tmp_path: Path) -> None:
    state = {"w": torch.ones(2)}
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": state, "extra": _NotATensor()}, path)
    with pytest.raises(ValueError, match="refused to load.*custom objects"):
        load_adm_state_dict(path)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "step": 7},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        lambda sd: {"ema": {f"_orig_mod.{k}": v for k, v in sd.items()}, "model": {"x": torch.zeros(1)}},
    ],
    ids=["raw", "state_dict", "model+module-prefix", "ema-first+compile-prefix"],
)
def test_common_wrappers_are_unwrapped(tmp_path: Path, wrap) -> None:
    state = {"time_embed.0.weight": torch.ones(2, 2), "out.2.bias": torch.zeros(3)}
    torch.save(wrap(state), tmp_path / "c.pt")
    loaded = load_adm_state_dict(tmp_path / "c.pt")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_unknown_wrapper_asks_for_key() -> None:
    state = {"a": torch.ones(1)}
    with pytest.raises(ValueError, match="--key"):
        unwrap_state_dict({"weights": state, "epoch": 3})
    assert unwrap_state_dict({"weights": state, "epoch": 3}, key="weights") == state


def test_six_channel_export_feeds_samplers_and_checks(converted: tuple[ADMReference, Path, Path]) -> None:
    """The other readers of an export take ε from the first in_channels of a learned-variance output."""
    from diffinject.diffusion import linear_alphas_cumprod
    from diffinject.measures.injection_check import bottleneck_h
    from diffinject.measures.sample_quality import sample_unconditional
    from diffinject.report.samples import unconditional_samples

    _, _, export = converted
    unet, _ = load_unet_export(export)
    abar = linear_alphas_cumprod()
    for clip in (False, True):
        images = sample_unconditional(unet, abar, num_samples=2, steps=5, clip=clip, image_size=28)
        assert images.shape == (2, 3, 28, 28) and torch.isfinite(images).all()
    samples, line = unconditional_samples(export, count=2, steps=5)
    assert samples is not None and samples.shape == (2, 3, 32, 32), line
    h = bottleneck_h(unet, torch.rand(3, 3, 28, 28), model_size=32)
    assert h.shape == (3, 64, 8, 8)


def test_converted_checkpoint_runs_the_inject_stage(
    converted: tuple[ADMReference, Path, Path], tmp_path: Path
) -> None:
    """A converted 6-channel ADM export drives `diffinject predict` (the inject stage) end to end."""
    from diffinject.cli import main as diffinject_main
    from diffinject.data import CMNISTDataModule

    _, _, export = converted
    data = CMNISTDataModule(root=str(tmp_path / "data"), source="embedded", ratio=0.01)
    data.setup("fit")
    train = data.train_eval_dataset
    topk = tmp_path / "topk.csv"
    write_topk(topk, train.labels, train.biases, k=1)
    run = tmp_path / "inject"
    config = {
        "return_predictions": False,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "default_root_dir": str(run), "enable_progress_bar": False,
            "logger": False,
            "callbacks": [{"class_path": WRITER, "init_args": {"output_dir": str(run)}}],
        },
        "model": {"class_path": "InjectionPredictModule", "init_args": {"unet": str(export), "steps": 5}},
        "data": {
            "class_path": "InjectionPairsDataModule",
            "init_args": {
                "data": {
                    "class_path": "CMNISTDataModule",
                    "init_args": {"root": str(tmp_path / "data"), "source": "embedded", "ratio": 0.01},
                },
                "topk": str(topk), "ratio": 0.002, "k": 1, "batch_size": 4,
            },
        },
    }  # fmt: skip
    path = tmp_path / "inject.yaml"
    path.write_text(yaml.safe_dump(config))
    diffinject_main(["predict", "--config", str(path)])
    with (run / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int(0.002 * len(train)) > 0
    from PIL import Image

    for r in rows:
        assert (run / r["path"]).is_file()
        assert Image.open(run / r["path"]).size == (28, 28)
    settings = json.loads((run / "settings.json").read_text())
    assert settings["unet_global_step"] == 123000
