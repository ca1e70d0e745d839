"""Saving and loading a GAN generator export (issue 22's baselines): one weights file + `gan_info.json`.

A fit stage writes `{export_dir}/generator.safetensors` (the network's `state_dict`, safetensors: nothing is
unpickled on load) and `{export_dir}/gan_info.json` (what rebuilds the network and how its images map to the
data: `format`, `model_size`, `channels`, `image_size`, `generator_args`, `global_step`, ...). The folder is
built beside the target and renamed into place (`data.tempdirs.replacing_directory`), so a reader never sees
half an export and a failed export keeps the previous one.
A predict stage reads it back with `read_gan_info` + `load_gan_weights`: every problem is an error naming the
file (missing, not JSON, keys or shapes that do not fit the network the info describes).
Generic on purpose: A²'s source / adapted generators can use the same two files under other folder names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinject.data.tempdirs import replacing_directory
from diffinject.nets.fingerprint import file_sha256

GAN_INFO = "gan_info.json"
GAN_WEIGHTS = "generator.safetensors"
GAN_FORMAT = "diffinject-gan-v1"


def save_gan_export(
    net: nn.Module, export_dir: str | os.PathLike[str], info: dict[str, Any], weights_name: str = GAN_WEIGHTS
) -> Path:
    """Write `net`'s state_dict (safetensors) and `info` (+ `format`, `weights_file`) to `export_dir`."""
    from safetensors.torch import save_file

    target = Path(export_dir)
    state = {key: value.detach().cpu().contiguous().clone() for key, value in net.state_dict().items()}
    record = {"format": GAN_FORMAT, **info, "weights_file": weights_name}
    with replacing_directory(target) as tmp:
        save_file(state, str(tmp / weights_name), metadata={"format": "pt"})
        (tmp / GAN_INFO).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return target


def read_gan_info(export_dir: str | os.PathLike[str], stage_hint: str = "") -> dict[str, Any]:
    """`gan_info.json` of an export as a dict; a missing, non-JSON or foreign file is an error naming it."""
    path = Path(export_dir) / GAN_INFO
    hint = f" (the fit stage writes it: `{stage_hint}`)" if stage_hint else ""
    if not path.is_file():
        raise FileNotFoundError(f"GAN export info {path} not found{hint}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); re-export the generator{hint}") from None
    if not isinstance(info, dict) or info.get("format") != GAN_FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise ValueError(f"{path}: format {found!r} is not a GAN export ({GAN_FORMAT!r} expected){hint}")
    return info


def gan_weights_path(export_dir: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """The weights file an info names (a bare file name inside the export folder, nothing else)."""
    name = str(info.get("weights_file", GAN_WEIGHTS))
    if Path(name).name != name or name.startswith("."):
        raise ValueError(f"{Path(export_dir) / GAN_INFO}: weights_file {name!r} must be a plain file name")
    return Path(export_dir) / name


def gan_weights_sha256(export_dir: str | os.PathLike[str], info: dict[str, Any]) -> str:
    """sha256 of the export's weights file: the identity a resumable writer records (not path or step)."""
    return file_sha256(gan_weights_path(export_dir, info))


def load_gan_weights(net: nn.Module, export_dir: str | os.PathLike[str], info: dict[str, Any]) -> nn.Module:
    """Fill `net` (built from the info's arguments) from the export; any key or shape mismatch names the file.

    Strict: a weights file for another width, depth or channel count must not load partially.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = gan_weights_path(export_dir, info)
    if not path.is_file():
        raise FileNotFoundError(f"GAN weights {path} not found (named by {Path(export_dir) / GAN_INFO})")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable safetensors file ({error}); re-export the generator"
        ) from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key}: file {tuple(state[key].shape)}, network {tuple(expected[key].shape)}"
        for key in sorted(set(state) & set(expected))
        if state[key].shape != expected[key].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        raise ValueError(
            f"{path} does not fit the generator described by {Path(export_dir) / GAN_INFO} "
            f"({info.get('generator_args')}): {'; '.join(parts)}"
        )
    with torch.no_grad():
        net.load_state_dict(state, strict=True)
    return net
