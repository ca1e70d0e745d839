"""The GAN generator export of issue 22's baselines (A² and AmpliBias): one format, one writer, one reader.

Layout of an export folder (built in a temporary sibling and renamed into place by
`data.tempdirs.replacing_directory`, so a reader never sees half an export and a failed export keeps the
previous one):
- `generator.safetensors`: the (EMA) generator's state dict; safetensors, so nothing is unpickled on load;
- `discriminator.safetensors` (optional; A² only): the discriminator the adaptation starts from;
- `gan_info.json`: `format` (`GAN_FORMAT`), `stage` (the stage that wrote it), `generator_class` and
  `generator_args` (what rebuilds the network), `discriminator_class` / `discriminator_args` with a
  discriminator, `preprocess`, `model_size`, `channels`, `image_size`, `global_step`, and what the stage adds.
The writer records the network classes itself, so a reader can refuse an export of the wrong kind (an
AmpliBias FastGenerator given to A², say) by name instead of failing on weight shapes. Every other problem
is an error naming the file too: missing, not JSON, another format, keys or shapes that do not fit the
network the info describes (strict: a file for another width must not load half its weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from diffinject.data.tempdirs import replacing_directory
from diffinject.diffusion.preprocess import PREPROCESS_RULE
from diffinject.nets.fingerprint import file_sha256

GAN_FORMAT = "diffinject-gan-v1"
GAN_INFO = "gan_info.json"
GAN_WEIGHTS = "generator.safetensors"
DISCRIMINATOR_WEIGHTS = "discriminator.safetensors"

G = TypeVar("G", bound=nn.Module)


def fit_hint(export_dir: str | os.PathLike[str], stage: str) -> str:
    """The command that writes an export of `stage`; the dataset guessed from runs/{dataset}/…."""
    parts = Path(export_dir).parts
    dataset = parts[parts.index("runs") + 1] if "runs" in parts[:-1] else "<dataset>"
    return f"diffinject fit --config configs/{dataset}/{stage}.yaml"


@dataclass
class GanExport(Generic[G]):
    """A loaded export: the generator (eval, no grad), optionally the discriminator, its info and identity."""

    path: Path
    info: dict[str, Any]
    generator: G
    #: sha256 of generator.safetensors: what a later stage records to refuse a retrained generator
    generator_sha256: str
    discriminator: nn.Module | None = None


def _plain_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (safetensors refuses views and shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def save_gan_export(
    generator: nn.Module,
    export_dir: str | os.PathLike[str],
    info: dict[str, Any],
    discriminator: nn.Module | None = None,
) -> Path:
    """Write the export atomically; `info` must hold `generator_args` (and `discriminator_args` with D)."""
    from safetensors.torch import save_file

    target = Path(export_dir)
    needed = ["generator_args"] + (["discriminator_args"] if discriminator is not None else [])
    missing = [key for key in needed if not isinstance(info.get(key), dict)]
    if missing:
        raise ValueError(f"GAN export {target}: info lacks {missing} (the networks' init args)")
    record = {**info, "format": GAN_FORMAT, "preprocess": PREPROCESS_RULE}
    record["generator_class"] = type(generator).__name__
    if discriminator is not None:
        record["discriminator_class"] = type(discriminator).__name__
    with replacing_directory(target) as tmp:
        save_file(_plain_state(generator), str(tmp / GAN_WEIGHTS), metadata={"format": "pt"})
        if discriminator is not None:
            save_file(
                _plain_state(discriminator), str(tmp / DISCRIMINATOR_WEIGHTS), metadata={"format": "pt"}
            )
        (tmp / GAN_INFO).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return target


def read_gan_info(export_dir: str | os.PathLike[str], hint: str = "") -> dict[str, Any]:
    """`gan_info.json` of an export, checked for format and preprocessing; errors name the file."""
    path = Path(export_dir)
    info_file = path / GAN_INFO
    rerun = f" (the fit stage writes it: `{hint}`)" if hint else ""
    if not info_file.is_file():
        raise FileNotFoundError(
            f"GAN export {info_file} not found (an export holds {GAN_INFO} and {GAN_WEIGHTS}){rerun}"
        )
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{info_file} is not valid JSON ({error}); re-export the generator{rerun}") from None
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    if found != GAN_FORMAT:
        raise ValueError(
            f"{info_file}: format {found!r} is not a GAN export ({GAN_FORMAT!r} expected){rerun}"
        )
    if info.get("preprocess") != PREPROCESS_RULE:
        raise ValueError(f"{info_file}: preprocess {info.get('preprocess')!r}, expected {PREPROCESS_RULE!r}")
    return info


def _build(info: dict[str, Any], info_file: Path, role: str, cls: type[G], hint: str) -> G:
    """The `role` network (generator / discriminator) the info describes; refuses another class."""
    found = info.get(f"{role}_class")
    if found != cls.__name__:
        what = f"holds a {found} {role}" if found is not None else f"has no {role}"
        fix = f"; point this setting at the export `{hint}` writes" if hint else ""
        raise ValueError(
            f"{info_file}: {what} (stage {info.get('stage')!r}), but a {cls.__name__} was expected here{fix}"
        )
    args = info.get(f"{role}_args")
    try:
        if not isinstance(args, dict):
            raise TypeError(f"{role}_args is {type(args).__name__}, not an object")
        net = cls(**args)
    except (TypeError, ValueError, KeyError) as error:
        raise ValueError(f"{info_file}: {role}_args do not build a {cls.__name__} ({error})") from None
    for attr in ("model_size", "channels"):
        mine = getattr(net, attr, None)
        if role == "generator" and attr in info and mine is not None and int(info[attr]) != int(mine):
            raise ValueError(f"{info_file}: {attr}={info[attr]} contradicts {role}_args {args}")
    return net


def load_weights(module: nn.Module, file: Path) -> None:
    """Fill `module` from a safetensors file, refusing missing/unexpected keys and other shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the GAN export {file.parent} is incomplete")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable safetensors file ({error}); re-export it") from None
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
            f"{file} does not fit the {type(module).__name__} its {GAN_INFO} describes: "
            f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )
    with torch.no_grad():
        module.load_state_dict(state, strict=True)


def load_gan_export(
    export_dir: str | os.PathLike[str],
    generator_class: type[G],
    hint: str = "",
    stages: Sequence[str] | None = None,
    expect: dict[str, Any] | None = None,
    discriminator_class: type[nn.Module] | None = None,
) -> GanExport[G]:
    """Read and check an export; the generator comes back in eval mode without gradients.

    Args:
        generator_class: the network the caller needs (another class in the info is refused by name).
        hint: the command that writes the export, quoted in errors.
        stages: the stages whose exports fit here (None: any).
        expect: info values that must match (top level first, else `generator_args`; None: not checked).
        discriminator_class: also load the discriminator (refused if the export has none or another).
    """
    path = Path(export_dir)
    info_file = path / GAN_INFO
    info = read_gan_info(path, hint)
    generator = _build(info, info_file, "generator", generator_class, hint)
    if stages is not None and info.get("stage") not in stages:
        raise ValueError(
            f"{info_file}: written by stage {info.get('stage')!r}, expected an export of {list(stages)}"
            + (f" (`{hint}`)" if hint else "")
        )
    args = info["generator_args"]
    for key, wanted in (expect or {}).items():
        have = info.get(key, args.get(key))
        if wanted is not None and have is not None and have != wanted:
            raise ValueError(f"{info_file}: the export has {key}={have}, but this run expects {key}={wanted}")
    load_weights(generator, path / GAN_WEIGHTS)
    loaded = GanExport(path, info, generator.eval().requires_grad_(False), file_sha256(path / GAN_WEIGHTS))
    if discriminator_class is not None:
        net = _build(info, info_file, "discriminator", discriminator_class, hint)
        load_weights(net, path / DISCRIMINATOR_WEIGHTS)
        loaded.discriminator = net
    return loaded
