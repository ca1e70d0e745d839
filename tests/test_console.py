"""What a stage process prints (issue 20 §2): the known library noise is dropped by message and module
while our own warnings still reach stderr; where no progress bar draws, a plain line with step, rate and
ETA comes at the configured interval; the model summary leaves out FLOPs nobody measured."""

from __future__ import annotations

import importlib.util
import logging
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

from diffinject.callbacks import console
from diffinject.callbacks.console import CompactSummary, PlainProgress, format_duration, progress_line
from diffinject.cli import DiffInjectCLI
from diffinject.logs import ACCELERATE_HINT, LIGHTNING_TIP, quiet_known_noise


class Records(logging.Handler):
    """Collects the records that reach a logger's handlers (after its filters)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def records() -> Iterator[Records]:
    """Lightning's and diffusers' loggers do not propagate to the root logger, so caplog would miss them."""
    handler = Records()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "diffusers")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def warn_from(module: str, filename: str, message: str) -> None:
    """Raise a UserWarning as code of `module` in `filename` does (the warnings machinery reads both)."""
    code = compile(f"import warnings\nwarnings.warn({message!r}, UserWarning)\n", filename, "exec")
    exec(code, {"__name__": module})


def test_known_noise_is_dropped_and_our_warnings_reach_stderr(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], records: Records
) -> None:
    from lightning.pytorch.utilities._pytree import _tree_flatten

    ours = str(Path(console.__file__).parent.parent / "stages" / "example.py")
    with warnings.catch_warnings():
        # as a plain process prints warnings (pytest records them instead)
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: (
            sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
        )
        quiet_known_noise()
        _tree_flatten(1)  # Lightning's own helper builds the deprecated LeafSpec: the real warning
        Trainer(accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False)  # the litlogger tip
        if importlib.util.find_spec("accelerate") is None:
            from diffusers import UNet2DModel

            blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
            UNet2DModel(
                sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, **blocks
            ).save_pretrained(tmp_path / "unet")
            UNet2DModel.from_pretrained(tmp_path / "unet", local_files_only=True)
        warn_from("diffinject.stages.example", ours, "our code found a real problem")
        warn_from(
            "lightning.pytorch.trainer.call", "/x/site-packages/lightning/call.py", "a new Lightning note"
        )
        logging.getLogger("diffinject.data").warning("our data module warns about %s", "data/bffhq")
    err = capfd.readouterr().err
    assert "LeafSpec" not in err
    assert f"{ours}:2: UserWarning: our code found a real problem" in err
    assert "a new Lightning note" in err  # same category, another message: only the known one is dropped
    assert "WARNING diffinject.data: our data module warns about data/bffhq" in err
    assert any(m.startswith("GPU available") for m in records.messages)  # the loggers do print
    assert not [m for m in records.messages if m.startswith((LIGHTNING_TIP, ACCELERATE_HINT))]


def test_every_cli_trainer_gets_plain_progress_and_a_summary_without_flops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, records: Records
) -> None:
    """The interval is honoured (a fake clock: 100 s per reading, a line at most every 350 s) and each line
    has the step, the rate and the ETA; the final one says how long the fit took."""
    monkeypatch.setattr("sys.argv", ["diffinject"])
    monkeypatch.setenv("DIFFINJECT_PROGRESS_S", "350")
    args = ["--trainer.max_steps", "6", "--trainer.limit_val_batches", "0", "--trainer.logger", "false"]
    args += ["--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--seed_everything", "0"]
    cli = DiffInjectCLI(BoringModel, BoringDataModule, run=False, args=args)
    callbacks = cli.trainer.callbacks
    assert [type(c) for c in callbacks if isinstance(c, ModelSummary)] == [CompactSummary]
    assert not any(type(c) in (ModelSummary, RichModelSummary) for c in callbacks)
    (progress,) = [c for c in callbacks if isinstance(c, PlainProgress)]
    assert progress.interval_s == 350
    progress.when = "always"  # a terminal with a bar would not print; this test is about the lines
    clock = iter(range(100, 10_000, 100))
    monkeypatch.setattr(console, "_now", lambda: float(next(clock)))
    capsys.readouterr()
    cli.trainer.fit(cli.model, cli.datamodule)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[progress]")]
    # start at 100, steps 1..6 read 200..700: a line at step 4 (500 - 100 >= 350), none after (700 - 500)
    assert lines[0] == "[progress] fit: epoch 1, step 4/6 (67%), 100 s/step, ETA 3 min"
    assert lines[1:] == ["[progress] fit: step 6/6 (100%), 117 s/step, done in 12 min"]
    assert not [m for m in records.messages if m.startswith(LIGHTNING_TIP)]  # filters come with the CLI
    assert any(m.startswith("GPU available") for m in records.messages)
    assert "FLOPs" not in out and "trainable" in out and "| Name" in out


def test_plain_progress_stays_quiet_on_a_terminal_with_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    tty = SimpleNamespace(isatty=lambda: True)
    monkeypatch.setattr("sys.stdout", tty)
    with_bar, without_bar = SimpleNamespace(progress_bar_callback=object()), SimpleNamespace()
    without_bar.progress_bar_callback = None
    assert not PlainProgress()._decide(with_bar)
    assert PlainProgress()._decide(without_bar)  # the bar is off: the lines are the only progress
    monkeypatch.setattr("sys.stdout", SimpleNamespace(isatty=lambda: False))  # nohup, CI, | tee
    assert PlainProgress()._decide(with_bar)
    assert not PlainProgress(when="never")._decide(without_bar)


def test_progress_line_and_durations() -> None:
    assert format_duration(20) == "<1 min" and format_duration(960) == "16 min"
    assert format_duration(3900) == "1 h 05 min"
    line = progress_line("fit", "step", 1200, 3200, 600.0, 1200, "epoch 3")
    assert line == "[progress] fit: epoch 3, step 1200/3200 (38%), 2 steps/s, ETA 17 min"
    assert (
        progress_line("predict", "batch", 5, float("inf"), 10.0, 5)
        == "[progress] predict: batch 5, 2 s/batch"
    )
