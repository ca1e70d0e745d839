"""Reading a classifier stage's checkpoint back: the network and the stage's own saved extras.

Stages hand each other files, never Trainer `ckpt_path`s: the top-K scorer loads the bias stage's weights and
checkpoint selection runs the bias model beside the classifier being trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffinject.nets import build_classifier

#: the key under which classifier stages store their own state (selected epoch, val metrics) in a checkpoint
CHECKPOINT_KEY = "diffinject"


def load_classifier_checkpoint(
    path: str | os.PathLike[str], expect: dict[str, Any]
) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a classifier-stage checkpoint (`checkpoints/best.ckpt`) and its saved stage extras.

    `expect` holds hyper-parameters that must match (e.g. num_classes); a mismatch names both values.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"classifier checkpoint {file} not found: run the bias fit stage first "
            "(`diffinject fit --config configs/<dataset>/bias.yaml`), which writes checkpoints/best.ckpt"
        )
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{file} is not a Lightning checkpoint (no 'state_dict')")
    saved = checkpoint.get("hyper_parameters", {})
    for key, value in expect.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"{file} was trained with {key}={saved[key]}, but this config has {value}")
    net = build_classifier(
        saved.get("arch", expect.get("arch")),
        saved.get("num_classes", expect.get("num_classes")),
        saved.get("in_channels", expect.get("in_channels")),
        saved.get("image_size", expect.get("image_size")),
        pretrained=False,
    )
    state = checkpoint["state_dict"]
    net.load_state_dict({k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")})
    return net, dict(checkpoint.get(CHECKPOINT_KEY, {}))
