"""What a stage process prints: known third-party noise dropped by message *and* module, ours kept and tagged.

A `make pipeline` log used to repeat, for every stage, hints and deprecation notices that say nothing about
the run. Each filter below names the library module (or logger) and the start of the message it drops, so a
warning from our own code, or a new one from a library, still reaches stderr and the stage's log
(tests/test_console.py). Nothing here imports Lightning or diffusers: the pipeline driver reads
`PROGRESS_TAG` and `OUR_LOG_PREFIX` without loading them.
"""

from __future__ import annotations

import logging
import sys
import warnings

#: the start of a plain progress line (`callbacks.console.PlainProgress`); the runner's heartbeat shows it
PROGRESS_TAG = "[progress]"
#: how our loggers' warnings are printed ("WARNING diffinject.data: …"), so the runner can tell them apart
OUR_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
OUR_LOGGER = "diffinject"

#: (message regex, category, module regex) of library warnings that say nothing about our run
NOISY_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # torch deprecated LeafSpec; Lightning 2.6's own pytree helper still builds one, twice per stage.
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        FutureWarning,
        r"lightning\.pytorch\.utilities\._pytree",
    ),
)

#: logger → starts of the messages it may not emit. A logger's filters see only the records created on it,
#: so each is the exact logger the library logs on.
ACCELERATE_HINT = "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
LIGHTNING_TIP = "💡 Tip: "
NOISY_RECORDS: dict[str, tuple[str, ...]] = {
    # diffusers suggests `accelerate` on every load. Measured on a 106 M-parameter UNet (406 MB), the load
    # takes as long and as much memory without it (README, "Progress and logs"): no dependency, no hint.
    "diffusers.models.modeling_utils": (ACCELERATE_HINT,),
    # Lightning's advertisements for litlogger / litmodels, printed by every Trainer.
    "lightning.pytorch.utilities.rank_zero": (LIGHTNING_TIP,),
    "lightning.fabric.utilities.rank_zero": (LIGHTNING_TIP,),
    "lightning_utilities.core.rank_zero": (LIGHTNING_TIP,),
}


class DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `prefixes`."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class CurrentStderr(logging.StreamHandler):
    """A handler on whatever `sys.stderr` is when a record comes (pytest swaps it per test)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def quiet_known_noise() -> None:
    """Install the filters above and a tagged handler for our own loggers' warnings (idempotent).

    Warnings filters go first in the list, so they win over a broader "default" filter that a library
    (Lightning) installs on import; everything they do not match keeps Python's handling.
    """
    for message, category, module in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in NOISY_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) and f.prefixes == prefixes for f in logger.filters):
            logger.addFilter(DropMessages(prefixes))
    ours = logging.getLogger(OUR_LOGGER)
    if not any(isinstance(h, CurrentStderr) for h in ours.handlers):
        handler = CurrentStderr()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter(OUR_LOG_FORMAT))
        ours.addHandler(handler)
