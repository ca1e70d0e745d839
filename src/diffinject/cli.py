"""The `diffinject` command: one LightningCLI for every stage, chosen by `class_path` in a YAML.

Usage: `diffinject fit|validate|test|predict --config configs/<dataset>/<stage>.yaml [--trainer ...]`.
Tests call `main([...])` in-process, as torchgeo does.
"""

from __future__ import annotations

import os
from typing import Any

# Nothing may be fetched from a model hub at run time: every UNet is trained here and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

import diffinject.data  # noqa: E402,F401  (registers the data modules for short class names)
import diffinject.stages  # noqa: E402,F401  (registers the stage modules)
from diffinject.callbacks.console import attach  # noqa: E402
from diffinject.logs import quiet_known_noise  # noqa: E402


class DiffInjectCLI(LightningCLI):
    """LightningCLI whose trainer prints for a log file as well as a terminal (`callbacks.console`).

    Added here rather than in the trainer presets, so every stage config keeps its own `callbacks` list
    and a config that sets `PlainProgress` itself (another interval) is not given a second one. The known
    library noise is silenced first (`logs.quiet_known_noise`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_known_noise()
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        return attach(super().instantiate_trainer(**kwargs))


def main(args: ArgsType = None) -> LightningCLI:
    """Run the CLI; returns it so tests can inspect the trainer and model."""
    return DiffInjectCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
        args=args,
    )


def entry() -> None:
    """Console-script entry (`diffinject`): exit status 0 on success, unlike returning the CLI object."""
    main()


if __name__ == "__main__":
    entry()
