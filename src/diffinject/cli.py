"""The `diffinject` command: one LightningCLI for every stage, chosen by `class_path` in a YAML.

Usage: `diffinject fit|validate|test|predict --config configs/<dataset>/<stage>.yaml [--trainer ...]`.
Tests call `main([...])` in-process, as torchgeo does.
"""

from __future__ import annotations

import os

# Nothing may be fetched from a model hub at run time: every UNet is trained here and saved locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning.pytorch import LightningDataModule, LightningModule  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402

import diffinject.data  # noqa: E402,F401  (registers the data modules for short class names)
import diffinject.stages  # noqa: E402,F401  (registers the stage modules)


def main(args: ArgsType = None) -> LightningCLI:
    """Run the CLI; returns it so tests can inspect the trainer and model."""
    return LightningCLI(
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
