"""P2DiffusionModule(init_from=...): fine-tuning a pretrained UNet (own export, diffusers folders, hub)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from lightning.pytorch import Trainer
from safetensors.torch import save_file

from diffinject.cli import main
from diffinject.diffusion import to_model_space
from diffinject.nets.pretrained import hub_network_allowed
from diffinject.nets.unet import load_unet_export, save_unet_export
from diffinject.stages import P2DiffusionModule
from diffusion_helpers import TinyDataModule, cmnist_like, register_tiny_preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def _tiny_unet(out_channels: int = 3, adm: bool = False, seed: int = 0) -> UNet2DModel:
    """A ~40-190 k parameter UNet at 28 px; `adm` = resnet up/down blocks + scale-shift norm (converter's)."""
    torch.manual_seed(seed)
    down, up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if adm else ("DownBlock2D", "UpBlock2D")
    return UNet2DModel(
        sample_size=28,
        in_channels=3,
        out_channels=out_channels,
        block_out_channels=(8, 16, 32),
        layers_per_block=1,
        down_block_types=(down,) * 3,
        up_block_types=(up,) * 3,
        norm_num_groups=4,
        attention_head_dim=8,
        resnet_time_scale_shift="scale_shift" if adm else "default",
    )


def _pipeline_folder(root: Path, unet: UNet2DModel, **scheduler: object) -> Path:
    """The layout of google/ddpm-* repos: unet/, scheduler/scheduler_config.json, model_index.json."""
    unet.save_pretrained(root / "unet")
    DDPMScheduler(**scheduler).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    return root


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _trainer(tmp_path: Path, max_steps: int) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
    )


def _module(init_from: Path | str, **kwargs: object) -> P2DiffusionModule:
    kwargs = {"image_size": 28, "sample_every_n_epochs": 0, "lr": 1e-3, **kwargs}
    return P2DiffusionModule(init_from=str(init_from), **kwargs)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any socket connection attempt is recorded and fails."""
    attempts: list[object] = []

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


# --------------------------------------------------------------------------------------- sources
def test_finetunes_from_own_export_and_records_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source_module = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, model_size=28)
    source = save_unet_export(source_module.ema_unet, tmp_path / "source", source_module.export_info())
    out = tmp_path / "finetuned"

    module = _module(source, export_dir=str(out), ema_decay=0.9999)  # unet_preset default is unused
    assert _same(module.unet, source_module.ema_unet) and _same(module.ema_unet, source_module.ema_unet)
    assert module.model_size == 28 and module.unet_preset == "test-tiny"
    _trainer(tmp_path, max_steps=3).fit(module, TinyDataModule(n=16))

    start = dict(source_module.ema_unet.named_parameters())
    online = {k: (p.detach() - start[k]).norm() for k, p in module.unet.named_parameters()}
    ema = {k: (p.detach() - start[k]).norm() for k, p in module.ema_unet.named_parameters()}
    assert sum(online.values()) > 0, "fine-tuning did not move the weights"
    # No EMA warm-up from a pretrained start: after 3 steps at decay 0.9999 the EMA is still ~the source
    # (with the warm-up it would be ~the online weights).
    assert 0 < sum(ema.values()) < 0.01 * sum(online.values())

    unet, info = load_unet_export(out)
    assert list(unet.config.block_out_channels) == list(source_module.unet.config.block_out_channels)
    assert unet.config.sample_size == 28 and info["unet_preset"] == "test-tiny" and info["global_step"] == 3
    record = info["init_from"]
    assert record["source"] == str(source) and record["path"] == str(source.resolve())
    weights = source / "diffusion_pytorch_model.safetensors"
    assert record["weights"] == [
        {"file": str(weights), "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    ]
    assert record["schedule_checked_against"].endswith("diffusion_info.json") and info["ema_warmup"] is False


@pytest.mark.parametrize("layout", ["plain", "pipeline"])
def test_loads_plain_and_pipeline_diffusers_folders(tmp_path: Path, layout: str) -> None:
    unet = _tiny_unet()
    if layout == "plain":
        unet.save_pretrained(tmp_path / "src")
        with pytest.warns(UserWarning, match="no diffusion_info.json or scheduler config"):
            module = _module(tmp_path / "src")
    else:
        module = _module(_pipeline_folder(tmp_path / "src", unet))
        assert module.init_record["schedule_checked_against"].endswith("scheduler/scheduler_config.json")
    assert _same(module.unet, unet) and _same(module.ema_unet, unet)
    assert module.model_size == 28 and module.unet_preset == "pretrained"
    _trainer(tmp_path, max_steps=1).fit(module, TinyDataModule(n=8))
    assert not _same(module.unet, unet)


def test_learned_variance_model_trains_only_eps(tmp_path: Path) -> None:
    src = _tiny_unet(out_channels=6, adm=True)
    src.save_pretrained(tmp_path / "adm")
    (tmp_path / "adm" / "diffusion_info.json").write_text(json.dumps({"beta_schedule": "linear"}))
    module = _module(tmp_path / "adm", export_dir=str(tmp_path / "out"), weight_decay=0.0)
    assert module.learned_variance

    x0 = to_model_space(cmnist_like(4)[0], 28)
    t, noise = torch.tensor([5, 100, 500, 990]), torch.randn(4, 3, 28, 28)
    loss = module.p2_loss(x0, t, noise)
    loss.backward()
    conv_out = module.unet.conv_out
    assert conv_out.weight.grad[3:].abs().sum() == 0 and conv_out.bias.grad[3:].abs().sum() == 0
    assert conv_out.weight.grad[:3].abs().sum() > 0
    with torch.no_grad():  # scrambling the variance channels cannot change the loss
        conv_out.bias[3:] += 1e3
        conv_out.weight[3:].normal_(std=10.0)
        assert module.p2_loss(x0, t, noise).item() == pytest.approx(loss.item(), rel=1e-6)
    module.unet.zero_grad(set_to_none=True)
    variance_head = conv_out.weight[3:].detach().clone()

    _trainer(tmp_path, max_steps=2).fit(module, TinyDataModule(n=8))
    assert torch.equal(conv_out.weight[3:], variance_head) and not torch.equal(
        conv_out.weight[:3], src.conv_out.weight[:3]
    )
    unet, info = load_unet_export(tmp_path / "out")
    assert unet.config.out_channels == 6 and unet.config.resnet_time_scale_shift == "scale_shift"
    assert info["learned_variance"] is True and "stale" in info["variance_head"]
    assert module.sample(num_samples=2, num_steps=5, seed=0).shape == (2, 3, 28, 28)


# ------------------------------------------------------------------------------------------- hub
def test_hub_id_resolves_from_the_local_cache_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object]
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--org--tiny-ddpm"
    unet = _tiny_unet(seed=3)
    snapshot = _pipeline_folder(repo / "snapshots" / SNAPSHOT, unet)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)

    module = _module("org/tiny-ddpm")
    assert _same(module.unet, unet) and module.init_record["path"] == str(snapshot)
    assert module.init_record["source"] == "org/tiny-ddpm" and not no_network


@pytest.mark.parametrize("offline", ["1", None])
def test_missing_hub_id_gives_a_clear_error_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[object], offline: str | None
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    if offline is None:  # unset counts as offline too
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        _module("google/ddpm-ema-celebahq-256")
    message = str(error.value)
    assert "init_from='google/ddpm-ema-celebahq-256'" in message
    assert str(tmp_path / "hf" / "hub" / "models--google--ddpm-ema-celebahq-256") in message
    assert "huggingface-cli download google/ddpm-ema-celebahq-256" in message and "HF_HOME" in message
    assert "local folder" in message and not no_network


def test_network_needs_an_explicit_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, allowed in ((None, False), ("1", False), ("true", False), ("0", True), ("off", True)):
        if value is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", value)
        assert hub_network_allowed() is allowed, value


# ---------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("scheduler", "hparams", "match"),
    [
        ({"beta_schedule": "scaled_linear"}, {}, r"scheduler_config.json: beta_schedule is 'scaled_linear'"),
        (
            {"prediction_type": "v_prediction"},
            {},
            r"scheduler_config.json: prediction_type is 'v_prediction'",
        ),
        ({"beta_end": 0.012}, {}, r"beta_end is 0.012 but the module's beta_end is 0.02"),
        (
            {},
            {"num_train_timesteps": 500, "sample_steps": 10},
            r"num_train_timesteps is 1000 but the module's",
        ),
    ],
)
def test_schedule_mismatch_is_an_error(tmp_path: Path, scheduler: dict, hparams: dict, match: str) -> None:
    folder = _pipeline_folder(tmp_path / "src", _tiny_unet(), **scheduler)
    with pytest.raises(ValueError, match=match):
        _module(folder, **hparams)


def test_schedule_of_own_export_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = P2DiffusionModule(register_tiny_preset(monkeypatch), image_size=28, model_size=28)
    folder = save_unet_export(source.ema_unet, tmp_path / "src", source.export_info())
    with pytest.raises(ValueError, match=r"diffusion_info.json: beta_start is 0.0001 but the module's"):
        _module(folder, beta_start=2e-4)


def test_contradicting_sizes_are_errors(tmp_path: Path) -> None:
    _tiny_unet().save_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match="model_size=32 contradicts the pretrained UNet's sample_size=28"):
        _module(tmp_path / "src", model_size=32)
    with pytest.raises(ValueError, match="in_channels=1 contradicts the pretrained UNet's in_channels=3"):
        _module(tmp_path / "src", in_channels=1)
    with pytest.raises(ValueError, match="image_size=32 contradicts the pretrained UNet's sample_size=28"):
        _module(tmp_path / "src", image_size=32)


def test_weights_that_do_not_fit_the_config_name_keys_and_shapes(tmp_path: Path) -> None:
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "src")
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    state.pop("time_embedding.linear_1.bias")
    state["extra.weight"] = torch.zeros(2)
    state["conv_out.weight"] = torch.zeros(3, 8, 1, 1)
    save_file(state, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ValueError) as error:
        _module(tmp_path / "src")
    message = str(error.value)
    assert "weights do not fit config.json" in message and "time_embedding.linear_1.bias" in message
    assert "1 unexpected (first: ['extra.weight'])" in message
    assert "conv_out.weight: checkpoint (3, 8, 1, 1) vs config (3, 8, 3, 3)" in message


def test_legacy_attention_names_load(tmp_path: Path) -> None:
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "src")
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for key, value in unet.state_dict().items():
        for new, legacy in old.items():
            key = key.replace(new, legacy) if key.startswith("mid_block.attentions") else key
        state[key] = value.clone()
    assert "mid_block.attentions.0.query.weight" in state
    save_file(state, tmp_path / "src" / "diffusion_pytorch_model.safetensors")
    with pytest.warns(UserWarning):
        assert _same(_module(tmp_path / "src").unet, unet)


_UNPICKLED: list[str] = []


def _mark_unpickled() -> dict:
    _UNPICKLED.append("ran")
    return {}


class _Payload:
    def __reduce__(self) -> tuple:
        return (_mark_unpickled, ())


def test_bin_weights_are_read_without_running_pickles(tmp_path: Path) -> None:
    unet = _tiny_unet()
    unet.save_pretrained(tmp_path / "good", safe_serialization=False)
    assert (tmp_path / "good" / "diffusion_pytorch_model.bin").is_file()
    with pytest.warns(UserWarning):
        assert _same(_module(tmp_path / "good").unet, unet)

    unet.save_pretrained(tmp_path / "evil", safe_serialization=False)
    torch.save(
        {**unet.state_dict(), "payload": _Payload()}, tmp_path / "evil" / "diffusion_pytorch_model.bin"
    )
    with pytest.raises(ValueError, match="refused to load, the pickle holds objects other than tensors"):
        _module(tmp_path / "evil")
    assert not _UNPICKLED


# ------------------------------------------------------------------------------------------- CLI
def test_cli_fit_accepts_init_from(tmp_path: Path) -> None:
    source = _pipeline_folder(tmp_path / "pretrained", _tiny_unet(seed=5))
    config = tmp_path / "diffusion.yaml"
    config.write_text(
        (CONFIGS / "cmnist" / "diffusion.yaml").read_text().replace("runs/", f"{tmp_path}/runs/")
    )
    cli = main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer",
            str(CONFIGS / "trainer" / "cpu.yaml"),
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.max_steps=2",
            f"--data.init_args.root={tmp_path / 'data'}",
            "--data.init_args.batch_size=8",
            "--model.init_args.sample_every_n_epochs=0",
            "--model.init_from",
            str(source),
        ]
    )
    assert cli.trainer.global_step == 2 and cli.model.hparams.init_from == str(source)
    unet, info = load_unet_export(tmp_path / "runs" / "cmnist" / "1pct" / "diffusion" / "unet")
    assert unet.config.block_out_channels == [8, 16, 32] and info["init_from"]["source"] == str(source)
