"""Read an ADM `.pt` checkpoint safely and write it as a diffusion export folder the inject stage reads.

Loading is `torch.load(path, map_location="cpu", weights_only=True)` only: a checkpoint that needs
arbitrary unpickling (custom classes) is refused. Accepted contents:
- a raw state dict {name: tensor} — what guided-diffusion / P2 / ILVR `train_util.save` writes
  (`model*.pt`, `ema_<rate>_*.pt`) and what their scripts `load_state_dict`;
- a dict wrapping it under one of `WRAPPER_KEYS` ("ema", "ema_model", "model_ema", "state_dict", "model",
  "net", "module"; the first found, or the one named by `key`), nested wrappers too;
- keys prefixed by "module." (DataParallel/DDP), "_orig_mod." (torch.compile) or "model." when *every* key
  carries the prefix.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import Tensor

from diffinject.convert.adm import ADMConfig, convert_state_dict, diffusers_config
from diffinject.diffusion.preprocess import PREPROCESS_RULE
from diffinject.nets.unet import save_unet_export

WRAPPER_KEYS = ("ema", "ema_model", "model_ema", "state_dict", "model", "net", "module")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
EXPORT_FORMAT = "diffinject-diffusion-v1"
# guided-diffusion's file names: model{step:06d}.pt, ema_{rate}_{step:06d}.pt (train_util.save)
_STEP_IN_NAME = re.compile(r"(?:^model|^ema_[0-9.]+_)(\d+)\.pt$")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def step_from_name(path: str | os.PathLike) -> int | None:
    """The training step in a guided-diffusion checkpoint name (ema_0.9999_500000.pt → 500000), else None."""
    match = _STEP_IN_NAME.search(Path(path).name)
    return int(match.group(1)) if match else None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, key: str | None = None, where: str = "checkpoint") -> dict[str, Tensor]:
    """The ADM state dict inside a loaded checkpoint (see the module doc for the accepted wrappers)."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{where}: no entry {key!r} (top-level keys: {found})")
        obj = obj[key]
    for _ in range(4):  # nested wrappers, e.g. {"state_dict": {"model": {...}}}
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        inner = next((k for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = obj[inner]
    if not _is_state_dict(obj):
        if isinstance(obj, Mapping):
            kinds = {str(k): type(v).__name__ for k, v in list(obj.items())[:12]}
            raise ValueError(
                f"{where}: not a state dict of tensors and no wrapper entry among {list(WRAPPER_KEYS)} "
                f"(found {kinds}); pass --key NAME for the entry holding the UNet weights"
            )
        raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")
    state = dict(obj)
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                stripped = True
    return state


def _torch_format(head: bytes) -> bool:
    """Whether a file starts like what `torch.save` writes: a zip archive or (legacy) a binary pickle."""
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80" or head[257:262] == b"ustar"


def _check_checkpoint_bytes(path: Path) -> bytes:
    """Refuse an empty file or a Git LFS pointer up front (torch says `EOFError` or blames custom objects)."""
    size = path.stat().st_size
    if size == 0:
        raise ValueError(
            f"{path} is empty (0 bytes), not a checkpoint: an interrupted download or copy? Fetch it again"
        )
    with path.open("rb") as handle:
        head = handle.read(512)
    if head.startswith(b"version https://git-lfs"):
        raise ValueError(
            f"{path} is a Git LFS pointer ({size} bytes), not the weights: fetch them (`git lfs pull`) or "
            "download the .pt file itself"
        )
    return head


def _load_error(path: Path, head: bytes, err: Exception) -> ValueError:
    """What a `torch.load` failure means for the user: custom objects, not a checkpoint, or a broken file."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
    detail = detail or type(err).__name__
    if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in detail:
        return ValueError(
            f"{path}: refused to load — it needs more than weights_only unpickling (tensors, dicts, lists, "
            f"numbers), i.e. it contains custom objects. Re-save its state dict with torch.save(sd, path) "
            f"in the environment that made it. ({detail})"
        )
    if not _torch_format(head):
        kind = "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:64]) else "binary data"
        return ValueError(
            f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive (or a binary pickle), this "
            f"file is {kind} starting with {head[:24]!r}"
        )
    return ValueError(
        f"{path} is not a readable PyTorch checkpoint — truncated or corrupted ({detail}); copy or download "
        "it again and compare its size or sha256 with the source"
    )


def load_adm_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, Tensor]:
    """Load `path` with `weights_only=True` (never arbitrary unpickling) and unwrap the state dict.

    An empty, truncated or non-checkpoint file is a `ValueError` saying so: torch reports those as a bare
    `EOFError`, a zip reader's `RuntimeError`, or the "weights only load failed" it gives custom objects.
    """
    path = Path(path)
    head = _check_checkpoint_bytes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files; each named in the message
        raise _load_error(path, head, err) from err
    return unwrap_state_dict(obj, key, where=str(path))


def export_info(
    cfg: ADMConfig, checkpoint: Path, sha256: str, preset: str | None, global_step: int | None
) -> dict[str, Any]:
    """`diffusion_info.json` of a converted checkpoint (keys as the diffusion stage's `export_info`)."""
    scale = 1000.0 / cfg.diffusion_steps  # ADM's linear schedule, stretched to T steps
    return {
        "format": EXPORT_FORMAT,
        "source": "adm",
        "source_checkpoint": checkpoint.name,
        "source_sha256": sha256,
        "adm_preset": preset,
        "adm": cfg.to_dict(),
        "image_size": cfg.image_size,
        "model_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "learned_variance": cfg.learn_sigma,
        "eps_channels": f"the first {cfg.in_channels} output channels are ε (DDIM uses only those)",
        "preprocess": PREPROCESS_RULE,
        "prediction_type": "epsilon",
        "beta_schedule": "linear",
        "num_train_timesteps": cfg.diffusion_steps,
        "beta_start": scale * 1e-4,
        "beta_end": scale * 0.02,
        "rescale_timesteps": cfg.rescale_timesteps,
        "weights": "converted",
        "global_step": global_step,
    }


def build_converted_unet(state: Mapping[str, Tensor], cfg: ADMConfig) -> UNet2DModel:
    """A diffusers UNet2DModel holding the ADM weights (eval mode, float32)."""
    unet = UNet2DModel(**diffusers_config(cfg))
    unet.load_state_dict(convert_state_dict(state, cfg, unet), strict=True)
    return unet.eval()


def convert_adm_checkpoint(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    cfg: ADMConfig,
    preset: str | None = None,
    key: str | None = None,
    global_step: int | None = None,
) -> tuple[Path, UNet2DModel, dict[str, Any]]:
    """Convert `checkpoint` and write the export folder `out` (atomically); returns (out, unet, info)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    unet = build_converted_unet(load_adm_state_dict(path, key), cfg)
    step = global_step if global_step is not None else step_from_name(path)
    info = export_info(cfg, path, sha256_file(path), preset, step)
    return save_unet_export(unet, out, info), unet, info
