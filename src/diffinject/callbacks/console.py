"""What a stage prints while it trains or predicts, for a terminal and for a log file alike.

- `PlainProgress`: where no progress bar draws (stdout is a file or a pipe: `nohup`, CI, `| tee`, the
  pipeline's stage logs; or the bar is turned off), one plain line about once a minute with the step,
  the rate and the ETA, so a 25-minute diffusion fit shows signs of life. The pipeline's heartbeat
  repeats the latest one on the terminal.
- `CompactSummary`: Lightning's model summary without the FLOPs column and total when they were not
  measured (no `example_input_array`: every row reads 0, which looks like a measurement).

`attach` puts both on every trainer the `diffinject` CLI builds.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from diffinject.logs import PROGRESS_TAG

#: seconds between progress lines unless a callback is given its own (`DIFFINJECT_PROGRESS_S`)
DEFAULT_INTERVAL_S = 60.0
#: the clock (tests replace it)
_now = time.monotonic


def format_duration(seconds: float) -> str:
    """ "<1 min", "16 min", "1 h 05 min": an ETA needs no second-level precision."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return "<1 min"
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _number(value: float) -> str:
    """Two significant digits below 10, whole numbers above ("0.35", "2.1", "12", "140")."""
    return f"{value:.2g}" if value < 10 else f"{value:.0f}"


def progress_line(
    what: str,
    unit: str,
    done: int,
    total: float,
    elapsed: float,
    counted: int,
    epoch: str = "",
    eta: bool = True,
) -> str:
    """`[progress] fit: epoch 3/100, step 1200/3200 (38%), 2.1 steps/s, ETA 16 min`.

    The rate is over `counted` units in `elapsed` seconds of this process (a resumed fit starts counting at
    its checkpoint's step); validation time is inside it, so the ETA includes the remaining validations.
    """
    parts = [epoch] if epoch else []
    finite = total not in (float("inf"), -1) and total > 0
    parts.append(f"{unit} {done}/{int(total)} ({100 * done / total:.0f}%)" if finite else f"{unit} {done}")
    if counted > 0 and elapsed > 0:
        rate = counted / elapsed
        parts.append(f"{_number(rate)} {unit}s/s" if rate >= 1 else f"{_number(1 / rate)} s/{unit}")
        if finite and eta:
            parts.append(f"ETA {format_duration(max(0.0, total - done) / rate)}")
    return f"{PROGRESS_TAG} {what}: {', '.join(parts)}"


class PlainProgress(Callback):
    """One plain progress line about every `interval_s` seconds where no progress bar draws.

    `when`: "auto" prints when stdout is not a terminal or the trainer has no progress bar; "always" /
    "never" force it. The interval defaults to `DIFFINJECT_PROGRESS_S` or 60 s.
    """

    def __init__(
        self, interval_s: float | None = None, when: Literal["auto", "always", "never"] = "auto"
    ) -> None:
        if interval_s is None:
            interval_s = float(os.environ.get("DIFFINJECT_PROGRESS_S", DEFAULT_INTERVAL_S))
        self.interval_s = interval_s
        self.when = when
        self.active = False
        self._start = self._last = 0.0
        self._first = self._done = 0
        self._total: float = 0

    def _decide(self, trainer: pl.Trainer) -> bool:
        if self.when != "auto":
            return self.when == "always"
        is_tty = getattr(sys.stdout, "isatty", lambda: False)()
        return not is_tty or trainer.progress_bar_callback is None

    def _begin(self, trainer: pl.Trainer, first: int, total: float) -> None:
        self.active = trainer.is_global_zero and self._decide(trainer)
        self._start = self._last = _now()
        self._first, self._done, self._total = first, first, total

    def _tick(self, trainer: pl.Trainer, what: str, unit: str, done: int, final: bool = False) -> None:
        self._done = done
        now = _now()
        if not self.active or (not final and now - self._last < self.interval_s):
            return
        self._last = now
        epoch = ""
        if what == "fit" and not final:
            epochs = trainer.max_epochs if trainer.max_steps in (-1, None) else None
            epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")
        elapsed = now - self._start
        line = progress_line(what, unit, done, self._total, elapsed, done - self._first, epoch, eta=not final)
        if final:
            line += f", done in {format_duration(elapsed)}"
        print(line, flush=True)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, trainer.global_step, trainer.estimated_stepping_batches)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._tick(trainer, "fit", "step", trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > self._first:
            self._tick(trainer, "fit", "step", trainer.global_step, final=True)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin(trainer, 0, sum(trainer.num_predict_batches))

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._tick(trainer, "predict", "batch", self._done + 1)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._done:
            self._tick(trainer, "predict", "batch", self._done, final=True)


def _count(number: int) -> str:
    """Lightning's "256 K", without the padding it gives small numbers ("0  ")."""
    return get_human_readable_count(number).strip()


class CompactSummary(ModelSummary):
    """The model summary as plain text (log files), without FLOPs when none were measured."""

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        rows = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
        rows.append("-" * len(rows[0]))
        for i in range(len(columns[0][1]) if columns else 0):
            rows.append(" | ".join(str(v[i]).ljust(w) for (_, v), w in zip(columns, widths, strict=True)))
        frozen = total_parameters - trainable_parameters
        totals = (
            f"{_count(trainable_parameters)} trainable + "
            f"{_count(frozen)} non-trainable params, {model_size:.1f} MB; modules: "
            f"{total_training_modes.get('train', 0)} train, {total_training_modes.get('eval', 0)} eval"
        )
        if total_flops:
            totals += f"; {_count(total_flops)} FLOPs"
        print("\n".join([*rows, totals]), flush=True)


def attach(trainer: pl.Trainer) -> pl.Trainer:
    """Give a trainer `PlainProgress` (unless it has one) and swap Lightning's default summary for ours."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[i] = CompactSummary(max_depth=getattr(callback, "_max_depth", 1))
    if not any(isinstance(callback, PlainProgress) for callback in trainer.callbacks):
        trainer.callbacks.append(PlainProgress())
    return trainer
