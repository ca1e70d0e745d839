"""A stage's output on its way to the terminal: all of it to the stage's `pipeline.log`, little to the screen.

The log file gets every byte the stage prints (the failure summary names it). The terminal gets the
pipeline's own lines and, read back from the log as it grows:
- every warning raised in our own code (a `…/diffinject/….py:N: …Warning: …` line, or a line of our
  loggers, `WARNING diffinject.…: …`), each time;
- each library warning once per source line for the whole run (Lightning's checkpoint notes would
  otherwise repeat for every stage; a new one still shows);
- a heartbeat about once a minute, with the stage's latest progress line (`callbacks.console.PlainProgress`)
  or, failing that, its latest progress-bar text.
`--verbose` (`VERBOSE=1`) streams the stage output instead, as before (`runner.Runner`).
"""

from __future__ import annotations

import codecs
import re
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from diffinject.logs import OUR_LOGGER, PROGRESS_TAG

#: seconds between heartbeat lines of a running stage
HEARTBEAT_S = 60.0
#: seconds between reads of a running stage's log
POLL_S = 1.0
#: a progress-bar line (tqdm / rich) in a stage's log
BAR = re.compile(r"\d+%\||it/s|s/it|\d+/\d+ ")
#: a warning as Python prints it (Lightning's own leave out the category)
WARNING_LINE = re.compile(r"^(?P<path>\S+\.py):(?P<line>\d+): (?P<text>\S.*)$")
#: a record of one of our loggers (`logs.OUR_LOG_FORMAT`)
OUR_LOG_LINE = re.compile(rf"^(?P<level>WARNING|ERROR|CRITICAL) {OUR_LOGGER}(\.[\w.]+)?: (?P<text>.*)$")
#: characters of a warning shown on the terminal (the whole of it is in the log)
CLIP = 300


def own_source(path: str) -> str | None:
    """`stages/classifiers.py` for a file of our package (a checkout or an installed copy), else None.

    The last `diffinject` folder of the path counts, so a checkout that is itself called `diffinject` does not
    make its virtualenv's libraries ours.
    """
    parts = re.split(r"[/\\]", path)
    at = [i for i, part in enumerate(parts[:-1]) if part == "diffinject"]
    if not at:
        return None
    rest = parts[at[-1] + 1 :]
    if any(part in ("site-packages", "dist-packages") for part in rest):
        return None
    return "/".join(rest)


def library_source(path: str) -> str:
    """`lightning/pytorch/trainer/call.py`: the path inside site-packages (else the last three parts)."""
    parts = re.split(r"[/\\]", path)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(marker) :])
    return "/".join(parts[-3:])


def clip(text: str) -> str:
    return text if len(text) <= CLIP else text[: CLIP - 1] + "…"


class Terminal:
    """Which lines of the stages' output reach the terminal; one per pipeline run, shared by its threads."""

    def __init__(self) -> None:
        self.shown: set[str] = set()
        self.lock = threading.Lock()

    def pick(self, line: str) -> str | None:
        """What to print for a line of stage output (None: the log has it, the terminal does not)."""
        line = line.strip()
        match = WARNING_LINE.match(line)
        if match:
            own = own_source(match["path"])
            where = f"{own or library_source(match['path'])}:{match['line']}"
            if own is not None:  # rank_zero_warn's UserWarning is the usual one; other categories are named
                return f"warning: {clip(match['text'].removeprefix('UserWarning: '))} ({where})"
            with self.lock:
                if where in self.shown:
                    return None
                self.shown.add(where)
            return f"library warning ({where}; shown once, all are in the stage logs): {clip(match['text'])}"
        match = OUR_LOG_LINE.match(line)
        if match:
            return f"{match['level'].lower()}: {clip(match['text'])}"
        return None


class LogTail:
    """The lines a process appends to its log from `offset` on (a progress bar's carriage return ends one)."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path = path
        self.offset = offset
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.rest = ""

    def read(self, final: bool = False) -> list[str]:
        """The complete lines written since the last read (`final`: the unterminated last one too)."""
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            data = handle.read()
        self.offset += len(data)
        *lines, self.rest = re.split(r"\r\n|\r|\n", self.rest + self.decoder.decode(data, final=final))
        if final and self.rest:
            lines.append(self.rest)
            self.rest = ""
        return lines


def format_elapsed(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def watch(
    process: subprocess.Popen,
    tail: LogTail,
    terminal: Terminal,
    say: Callable[[str], None],
    heartbeat_s: float | None = None,
    poll_s: float | None = None,
    echo: bool = False,
) -> int:
    """Wait for a stage command that writes to its log; pass on what `terminal` picks (`echo`: every line);
    returns the exit code.

    A heartbeat comes every `heartbeat_s` (default `HEARTBEAT_S`), or as soon as a new progress line arrives
    after half of that (the stage prints one about once a minute, so the terminal shows it while it is fresh).
    """
    heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
    poll_s = POLL_S if poll_s is None else poll_s
    started = last_beat = time.monotonic()
    progress = bar = ""
    fresh = False
    while True:
        try:
            code: int | None = process.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            code = None
        for line in tail.read(final=code is not None):
            text = line.strip()
            if echo and text:
                say(text)
            if text.startswith(PROGRESS_TAG):
                progress, fresh = text[len(PROGRESS_TAG) :].strip(), True
                continue
            shown = None if echo else terminal.pick(text)
            if shown:
                say(shown)
            elif BAR.search(text):
                bar = text[:150]
        if code is not None:
            return code
        now = time.monotonic()
        since = now - last_beat
        if since >= heartbeat_s or (fresh and since >= heartbeat_s / 2):
            latest = progress or bar
            news = f" | {latest}" if latest else f" (output: {tail.path})"
            say(f"running for {format_elapsed(now - started)}{news}")
            last_beat, fresh = now, False
