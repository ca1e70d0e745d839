"""The A² generator export: the folder the source and adaptation stages write and the later stages read.

Layout of `{stage folder}/generator/` (written into a hidden sibling and renamed into place, so a reader
never sees half an export and an interrupted run leaves the previous one intact):
- `generator.safetensors`: the EMA generator's state dict (`nets.gan_style.StyleGenerator`);
- `discriminator.safetensors`: the discriminator at the end of training (the adaptation starts from it,
  as Ojha et al.'s code starts both networks from the source checkpoint);
- `gan_info.json`: `format`, `stage`, `image_size` (data side), `channels`, `model_size`, `preprocess`,
  `generator` (StyleGenerator init args), `discriminator` (StyleDiscriminator init args), `weights: "ema"`,
  `global_step`, and what the stage adds (the adaptation: its source's path and sha256, the top-K file).
Loading never unpickles: safetensors only, and every key and shape is matched against the architecture the
info describes, so a file that does not fit fails naming itself instead of loading half the weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffinject.diffusion.preprocess import PREPROCESS_RULE
from diffinject.nets.fingerprint import file_sha256
from diffinject.nets.gan_style import StyleDiscriminator, StyleGenerator

FORMAT = "diffinject-a2-gan-v1"
INFO_FILENAME = "gan_info.json"
GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
GENERATOR_ARGS = ("model_size", "channels", "z_dim", "w_dim", "mapping_layers", "width", "max_width")
DISCRIMINATOR_ARGS = ("model_size", "channels", "width", "max_width", "mbstd_group")


def stage_hint(export_dir: Path) -> str:
    """The command that writes an export; dataset and stage guessed from runs/{dataset}/…/{stage}/."""
    parts = export_dir.parts
    stage = parts[-2] if len(parts) >= 2 and parts[-2] in ("a2_source", "a2_adapt") else "a2_source"
    dataset = parts[parts.index("runs") + 1] if "runs" in parts[:-1] else "<dataset>"
    return f"diffinject fit --config configs/{dataset}/{stage}.yaml"


@dataclass
class GanExport:
    """A loaded export: the generator (eval, no grad), optionally the discriminator, its info and identity."""

    path: Path
    info: dict[str, Any]
    generator: StyleGenerator
    generator_sha256: str
    discriminator: StyleDiscriminator | None = None


def save_gan_export(
    export_dir: str | os.PathLike[str],
    generator: StyleGenerator,
    info: dict[str, Any],
    discriminator: StyleDiscriminator | None = None,
) -> Path:
    """Write the export atomically (temp sibling folder + rename); returns its path."""
    target = Path(export_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        save_file(_plain_state(generator), str(tmp / GENERATOR_FILE))
        if discriminator is not None:
            save_file(_plain_state(discriminator), str(tmp / DISCRIMINATOR_FILE))
        payload = {**info, "format": FORMAT, "preprocess": PREPROCESS_RULE}
        (tmp / INFO_FILENAME).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses views and shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def read_gan_info(export_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`gan_info.json` of an export, checked for what every reader needs; errors name the file."""
    path = Path(export_dir)
    info_file = path / INFO_FILENAME
    if not path.is_dir() or not info_file.is_file():
        raise FileNotFoundError(
            f"A² generator export {path} not found (expected {INFO_FILENAME} and {GENERATOR_FILE} in it): "
            f"run `{stage_hint(path)}` first"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{info_file} is not valid JSON ({error}); rerun `{stage_hint(path)}`") from None
    if not isinstance(info, dict) or not isinstance(info.get("generator"), dict):
        raise ValueError(
            f"{info_file} must be a JSON object with a 'generator' object (the StyleGenerator init args "
            f"{', '.join(GENERATOR_ARGS)}); rerun `{stage_hint(path)}`"
        )
    if info.get("format") != FORMAT:
        raise ValueError(f"{info_file}: format {info.get('format')!r}, expected {FORMAT!r}")
    if info.get("preprocess") != PREPROCESS_RULE:
        raise ValueError(f"{info_file}: preprocess {info.get('preprocess')!r}, expected {PREPROCESS_RULE!r}")
    missing = [k for k in GENERATOR_ARGS if k not in info["generator"]]
    if missing:
        raise ValueError(
            f"{info_file}: 'generator' lacks {missing}; expected the keys {list(GENERATOR_ARGS)}"
        )
    return info


def check_info(info: dict[str, Any], info_file: Path, expect: dict[str, Any]) -> None:
    """Every key in `expect` (e.g. channels, image_size from the data module) must match the export's."""
    for key, wanted in expect.items():
        have = info.get(key, info["generator"].get(key))
        if wanted is not None and have is not None and int(have) != int(wanted):
            raise ValueError(f"{info_file}: the export has {key}={have}, but this run expects {key}={wanted}")


def load_state(module: nn.Module, file: Path) -> None:
    """Load a safetensors state dict into `module`, refusing missing/unexpected keys and other shapes."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the A² generator export is incomplete")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error})") from None
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, expected {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{file} does not fit the {type(module).__name__} its {INFO_FILENAME} describes: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    module.load_state_dict(state)


def load_gan_export(
    export_dir: str | os.PathLike[str], expect: dict[str, Any] | None = None, discriminator: bool = False
) -> GanExport:
    """Read and check an export; the generator comes back in eval mode without gradients."""
    path = Path(export_dir)
    info = read_gan_info(path)
    check_info(info, path / INFO_FILENAME, expect or {})
    generator = StyleGenerator(**{k: info["generator"][k] for k in GENERATOR_ARGS})
    load_state(generator, path / GENERATOR_FILE)
    loaded = GanExport(path, info, generator.eval().requires_grad_(False), file_sha256(path / GENERATOR_FILE))
    if discriminator:
        args = info.get("discriminator")
        if not isinstance(args, dict) or any(k not in args for k in DISCRIMINATOR_ARGS):
            raise ValueError(
                f"{path / INFO_FILENAME}: no usable 'discriminator' entry (expected "
                f"{list(DISCRIMINATOR_ARGS)}); set init_discriminator: fresh or rerun the source stage"
            )
        net = StyleDiscriminator(**{k: args[k] for k in DISCRIMINATOR_ARGS})
        load_state(net, path / DISCRIMINATOR_FILE)
        loaded.discriminator = net
    return loaded
