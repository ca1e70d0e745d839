"""Pretrained UNets to fine-tune from (`P2DiffusionModule(init_from=...)`): resolve, load safely, check.

`init_from` is a local folder or a Hugging Face hub id. Accepted folder layouts:
- our export (`config.json` + weights + `diffusion_info.json`: the diffusion stage, `diffinject.convert`);
- a plain diffusers `UNet2DModel` folder (`config.json` + weights, e.g. `unet.save_pretrained(...)`);
- a diffusers pipeline folder with the UNet in `unet/` and `scheduler/scheduler_config.json`
  (the layout of `google/ddpm-ema-celebahq-256`).

Hub ids are resolved **from the local cache only** unless `HF_HUB_OFFLINE` is explicitly set to a false
value (`0`, `false`, `no`, `off`): a hub id never silently becomes a download (the CLI and the pipeline
default `HF_HUB_OFFLINE=1`). The cache directory follows huggingface_hub's rules, read at call time.

Weights are read without executing pickles: safetensors when present, otherwise `torch.load` with
`weights_only=True` (a `.bin` holding anything but tensors is refused). The state dict is matched against
the config ourselves, so a checkpoint that does not fit fails naming the first missing / unexpected keys
and the shapes that differ, instead of being half-loaded over random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor

from diffinject.diffusion.preprocess import PREPROCESS_RULE
from diffinject.nets.unet import INFO_FILENAME, read_export_info

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
SAFETENSORS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BIN_NAME = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIGS = ("scheduler/scheduler_config.json", "scheduler_config.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.bin"]
FALSE_VALUES = {"0", "false", "no", "off"}
# Keys of pre-0.14 diffusers attention blocks (old hub checkpoints such as google/ddpm-*) → current names.
LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass
class PretrainedUNet:
    """A loaded pretrained UNet and where it came from (recorded in the fine-tuned export)."""

    spec: str
    root: Path
    unet_dir: Path
    unet: UNet2DModel
    info_file: Path | None
    info: dict[str, Any] | None
    scheduler_file: Path | None
    scheduler: dict[str, Any] | None
    weights: list[dict[str, str]] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """Provenance for `diffusion_info.json` of a model fine-tuned from this source."""
        return {
            "source": self.spec,
            "path": str(self.root),
            "unet_dir": str(self.unet_dir),
            "weights": self.weights,
            "info": self.info,
        }


# ----------------------------------------------------------------------------------------------- resolve
def hub_network_allowed() -> bool:
    """Downloads only on an explicit opt-in (`HF_HUB_OFFLINE=0`); unset counts as offline."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() in FALSE_VALUES


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, computed from the environment now (not at import time)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(env[name]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_source(spec: str) -> Path:
    """`init_from` → a local folder: an existing path as is, else a hub id looked up in the cache."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"init_from={spec!r} is a file; expected a model folder")
        return path.resolve()
    if not HUB_ID.match(spec):
        raise FileNotFoundError(f"init_from={spec!r}: no such folder ({path.resolve()})")
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    online = hub_network_allowed()
    try:
        folder = snapshot_download(
            spec, cache_dir=cache, local_files_only=not online, allow_patterns=HUB_PATTERNS
        )
    except Exception as error:  # LocalEntryNotFoundError, an incomplete snapshot, no connection...
        repo_cache = cache / f"models--{spec.replace('/', '--')}"
        absent = type(error).__name__ == "LocalEntryNotFoundError" and not online  # not merely incomplete
        how = "searched offline, not there" if absent else f"{type(error).__name__}: {error}"
        raise FileNotFoundError(
            f"init_from={spec!r} is neither a local folder ({path.resolve()} does not exist) nor a model in "
            f"the Hugging Face cache {repo_cache} ({how}). Fix: on a connected machine run "
            f"`hf download {spec}` (older huggingface_hub: `huggingface-cli download {spec}`) and point "
            "HF_HOME / HF_HUB_CACHE at that cache, or pass a local folder (a `save_pretrained` UNet, a "
            "pipeline folder with unet/, or `python -m diffinject.convert ... --out <dir>`); "
            "HF_HUB_OFFLINE=0 lets this run download it"
        ) from error
    return Path(folder)


def find_unet_dir(root: Path) -> Path:
    """The folder holding the UNet's `config.json`: `unet/` of a pipeline folder, else `root` itself."""
    for candidate in (root / "unet", root):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{root}: no UNet found (expected config.json + weights, or a pipeline folder with "
        f"unet/config.json); it holds {sorted(p.name for p in root.iterdir())[:10]}"
    )


# ------------------------------------------------------------------------------------------------ weights
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_bin(path: Path) -> dict[str, Tensor]:
    """A pickled state dict read with `weights_only=True`: anything but containers of tensors is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path}: refused to load, the pickle holds objects other than tensors (weights_only=True "
            f"failed). Only plain state dicts are read; save it as safetensors instead. ({error})"
        ) from error
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return dict(state)


def weight_files(unet_dir: Path) -> list[Path]:
    """The weight files to read, safetensors preferred over a pickled `.bin`."""
    if (unet_dir / SAFETENSORS_NAME).is_file():
        return [unet_dir / SAFETENSORS_NAME]
    if (unet_dir / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((unet_dir / SAFETENSORS_INDEX).read_text())["weight_map"]
        return [unet_dir / name for name in sorted(set(weight_map.values()))]
    if (unet_dir / BIN_NAME).is_file():
        return [unet_dir / BIN_NAME]
    raise FileNotFoundError(
        f"{unet_dir}: no weights ({SAFETENSORS_NAME}, {SAFETENSORS_INDEX} or {BIN_NAME}) next to config.json"
    )


def read_state_dict(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for path in files:
        state.update(load_file(path) if path.suffix == ".safetensors" else _load_bin(path))
    return state


def _rename_legacy_attention(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state.items():
        new = key
        if key not in expected:
            for old, current in LEGACY_ATTENTION.items():
                candidate = key.replace(old, current)
                if candidate != key and candidate in expected:
                    new = candidate
                    break
        renamed[new] = value
    return renamed


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], where: str) -> None:
    """Raise naming the first missing / unexpected keys and mismatched shapes (checkpoint vs config)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{len(items)} {what} (first: {items[:5]})"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("with other shapes", shapes))
        if items
    ]
    raise ValueError(f"{where}: the weights do not fit config.json: " + "; ".join(parts))


def load_unet(unet_dir: Path) -> tuple[UNet2DModel, list[dict[str, str]]]:
    """Build the UNet from `config.json` and load its weights strictly; returns it with file hashes."""
    config = json.loads((unet_dir / "config.json").read_text())
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise ValueError(
            f"{unet_dir / 'config.json'}: _class_name is {name!r}; only UNet2DModel is supported"
        )
    unet = UNet2DModel.from_config(config)
    files = weight_files(unet_dir)
    expected = unet.state_dict()
    state = _rename_legacy_attention(read_state_dict(files), expected)
    check_state_dict(state, expected, str(files[0] if len(files) == 1 else unet_dir))
    unet.load_state_dict(state)
    return unet, [{"file": str(p), "sha256": _sha256(p)} for p in files]


def _first_file(*paths: Path) -> Path | None:
    return next((p for p in paths if p.is_file()), None)


def _read_json(path: Path | None) -> dict[str, Any] | None:
    """A JSON object file (diffusion_info.json, scheduler config); a broken one is named, not a raw trace."""
    if path is None:
        return None
    if path.name == INFO_FILENAME:
        return read_export_info(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); expected a scheduler config object") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; expected a scheduler config object")
    return data


def load_pretrained(spec: str) -> PretrainedUNet:
    """Resolve `spec` (folder or cached hub id) and load its UNet, diffusion_info and scheduler config."""
    root = resolve_source(spec)
    unet_dir = find_unet_dir(root)
    unet, weights = load_unet(unet_dir)
    info_file = _first_file(unet_dir / INFO_FILENAME, root / INFO_FILENAME)
    scheduler_file = _first_file(*(root / p for p in SCHEDULER_CONFIGS))
    info, scheduler = _read_json(info_file), _read_json(scheduler_file)
    return PretrainedUNet(spec, root, unet_dir, unet, info_file, info, scheduler_file, scheduler, weights)


# ------------------------------------------------------------------------------------------------- checks
def _close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 + 1e-6 * abs(float(b))


def check_schedule(
    source: PretrainedUNet, num_train_timesteps: int, beta_start: float, beta_end: float
) -> str:
    """Raise if the source was trained under another noise schedule; returns the files checked.

    Fine-tuning under a different schedule would be a silent bug, so every mismatch names the file, the
    field, both values and the fix. Returns "" when the source describes no schedule (nothing to check).
    A missing field counts as the diffusers default (linear, ε, no trained betas).
    """
    linear_eps = {"beta_schedule": "linear", "prediction_type": "epsilon"}
    described = [
        (source.info_file, source.info, {**linear_eps, "preprocess": PREPROCESS_RULE}),
        (source.scheduler_file, source.scheduler, {**linear_eps, "trained_betas": None}),
    ]
    checked = []
    for where, cfg, required in described:
        if cfg is None:
            continue
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError(f"{where}: rescale_betas_zero_snr is true; only the plain linear β is supported")
        for key, want in required.items():
            if cfg.get(key, want) != want:
                raise ValueError(
                    f"{where}: {key} is {cfg[key]!r}, but P2DiffusionModule trains a linear-β ε-prediction "
                    f"DDPM ({key} must be {want!r}); this model cannot be fine-tuned here"
                )
        for key, mine in (
            ("num_train_timesteps", num_train_timesteps),
            ("beta_start", beta_start),
            ("beta_end", beta_end),
        ):
            if key in cfg and not _close(cfg[key], mine):
                raise ValueError(
                    f"{where}: {key} is {cfg[key]} but the module's {key} is {mine}; fine-tuning under "
                    f"another schedule is a silent bug: set model.init_args.{key}: {cfg[key]}"
                )
        checked.append(str(where))
    return ", ".join(checked)


def check_architecture(
    source: PretrainedUNet, in_channels: int, model_size: int | None, image_size: int
) -> int:
    """Check the module's explicit sizes against the loaded config; returns the model size to use."""
    config = source.unet.config
    where = source.unet_dir / "config.json"
    if int(config.in_channels) != int(in_channels):
        raise ValueError(
            f"in_channels={in_channels} contradicts the pretrained UNet's in_channels={config.in_channels} "
            f"({where})"
        )
    if int(config.out_channels) not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"{where}: out_channels={config.out_channels}; expected {in_channels} (ε) or {2 * in_channels} "
            "(ε + learned variance)"
        )
    size = config.sample_size
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise ValueError(f"{where}: non-square sample_size {size} is not supported")
        size = size[0]
    size = int(size)
    if model_size is not None and int(model_size) != size:
        raise ValueError(
            f"model_size={model_size} contradicts the pretrained UNet's sample_size={size} ({where}); "
            "leave model_size unset (null) to take it from the model"
        )
    trained_on = (source.info or {}).get("image_size")
    if int(image_size) != size and (trained_on is None or int(trained_on) != int(image_size)):
        raise ValueError(
            f"image_size={image_size} contradicts the pretrained UNet's sample_size={size} ({where}): the "
            f"images would be padded or resized to {size} px, which the model never saw; set "
            f"model.init_args.image_size and the data module's image_size to {size}"
        )
    return size
