"""`diffinject-convert adm CKPT --out DIR [flags]` (also `python -m diffinject.convert`).

Architecture flags start from a preset (`--arch`, default p2-ffhq) and override it one by one. Both
spellings work: `--num-res-blocks 1` and guided-diffusion's `--num_res_blocks 1`; booleans take
`--learn-sigma` / `--no-learn-sigma` or ADM's `--learn_sigma True|False`, so the MODEL_FLAGS line of the
P2 / ILVR / guided-diffusion READMEs can be pasted as is. ADM flags that do not change the network's
weights are accepted and checked (`--class_cond` must be False, `--noise_schedule` linear,
`--predict_xstart` False) or ignored (`--use_fp16`, `--use_checkpoint`, `--rescale_learned_sigmas`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from diffinject.convert.adm import ADM_PRESETS, ADMConfig
from diffinject.convert.checkpoint import convert_adm_checkpoint

_BOOL_FLAGS = (
    "learn_sigma",
    "use_scale_shift_norm",
    "resblock_updown",
    "use_new_attention_order",
    "rescale_timesteps",
)
_INT_FLAGS = (
    "image_size",
    "num_channels",
    "num_res_blocks",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "in_channels",
    "diffusion_steps",
)
_IGNORED = ("use_fp16", "use_checkpoint", "rescale_learned_sigmas")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err


def _names(name: str) -> list[str]:
    dashed = name.replace("_", "-")
    return [f"--{dashed}", f"--{name}"] if dashed != name else [f"--{name}"]


def _adm_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "adm",
        help="OpenAI guided-diffusion / P2 / ILVR UNet checkpoint (.pt)",
        description="Convert an ADM UNet checkpoint into a diffusion export folder for the inject stage. "
        "Architecture flags default to the --arch preset; p2-ffhq / p2-afhqdog / ilvr-* are P2's 256 px UNet "
        "(128 channels, mult 1,1,2,2,4,4, 1 res block, attention at 16 px with 64-channel heads, scale-shift "
        "norm, residual up/down-sampling, learned sigma: 6 output channels; linear betas, T = 1000).",
    )
    p.add_argument("checkpoint", type=Path, help="the .pt file (raw state dict or a wrapper, see docs)")
    p.add_argument(
        "--out", type=Path, required=True, help="export folder to write (UNet + diffusion_info.json)"
    )
    p.add_argument("--arch", choices=sorted(ADM_PRESETS), default="p2-ffhq", help="architecture preset")
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights (default: auto)")
    p.add_argument(
        "--global-step", type=int, default=None, help="training step to record (default: from name)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    for name in _INT_FLAGS:
        p.add_argument(*_names(name), dest=name, type=int, default=None)
    p.add_argument(
        *_names("channel_mult"), dest="channel_mult", type=_int_list, default=None, help="e.g. 1,1,2,2,4,4"
    )
    p.add_argument(
        *_names("attention_resolutions"), dest="attention_resolutions", type=_int_list, default=None,
        help="pixel sizes with attention, e.g. 16 or 32,16,8",
    )  # fmt: skip
    p.add_argument(*_names("dropout"), dest="dropout", type=float, default=None)
    for name in _BOOL_FLAGS:
        p.add_argument(*_names(name), dest=name, type=_bool, nargs="?", const=True, default=None)
        p.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false")
    p.add_argument(*_names("class_cond"), dest="class_cond", type=_bool, nargs="?", const=True, default=False)
    p.add_argument(
        *_names("predict_xstart"), dest="predict_xstart", type=_bool, nargs="?", const=True, default=False
    )
    p.add_argument(*_names("noise_schedule"), dest="noise_schedule", default="linear")
    for name in _IGNORED:
        p.add_argument(*_names(name), dest=f"ignored_{name}", type=_bool, nargs="?", const=True, default=None)
    return p


def config_from_args(args: argparse.Namespace) -> ADMConfig:
    """The preset `args.arch` with every flag given on the command line applied over it."""
    if args.class_cond:
        raise ValueError("class-conditional ADM checkpoints (--class_cond True) are not supported")
    if args.predict_xstart:
        raise ValueError("x0-predicting ADM checkpoints (--predict_xstart True) are not supported: ε only")
    if args.noise_schedule != "linear":
        raise ValueError(f"only the linear noise schedule is supported, got {args.noise_schedule!r}")
    overrides = {
        f.name: getattr(args, f.name) for f in fields(ADMConfig) if getattr(args, f.name, None) is not None
    }
    return replace(ADM_PRESETS[args.arch], **overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffinject-convert",
        description="Convert external diffusion checkpoints into diffinject exports.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _adm_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry; returns 0, or prints the reason and returns 2 (bad flags / mismatched checkpoint)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
            raise ValueError(f"{args.out} exists and is not empty (pass --overwrite to replace it)")
        out, unet, info = convert_adm_checkpoint(
            args.checkpoint, args.out, cfg, preset=args.arch, key=args.key, global_step=args.global_step
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"diffinject-convert: error: {err}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in unet.parameters())
    print(
        f"wrote {out}: UNet2DModel, {params / 1e6:.2f} M parameters, {info['out_channels']} output channels, "
        f"{info['image_size']} px, from {info['source_checkpoint']} (sha256 {info['source_sha256'][:12]}…)"
    )
    return 0
