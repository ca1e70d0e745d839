"""One pipeline at a time per run root: `{root}/.pipeline.lock`, an exclusive `flock` held for the whole run.

Two pipelines on one root race: the second "resumes" a stage the first is still writing, or clears it
(`rmtree`) because its config differs, and both exit 0. `pipeline_lock` takes a non-blocking exclusive
`fcntl.flock` on the lock file and writes who holds it (pid, host, start time, command), so a second
pipeline gets `LockHeld` naming the holder before it touches any stage. The kernel drops an flock when its
holder dies (kill -9 included), so the file a killed run left behind is taken over with a one-line notice:
no pid guessing, no manual cleanup. The lock is re-entrant within a process: `make study` holds a variant's
root while it links the shared stages, then runs the pipeline in-process on that root.

Stdlib only, so holding or inspecting a lock imports no torch. Not inherited by the stage subprocesses
(Python opens files non-inheritable): a pipeline killed alone, not with its process group, leaves its
current stage running unlocked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".pipeline.lock"
#: resolved lock path → nesting depth, for the locks this process holds
_HELD: dict[str, int] = {}


class LockHeld(RuntimeError):
    """Another live process holds the run root (printed without a traceback, exit code 2)."""


def describe_holder(info: dict[str, Any] | None) -> str:
    """`pid N on host H since T (command: …)`, from what the holder wrote into the lock file."""
    if not info:
        return "a process that has not written its details yet"
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {info.get('started', '?')} "
        f"(command: {info.get('command', '?')})"
    )


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace") or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _acquire(path: Path, root: Path) -> int:
    """An fd holding the flock of `path`, whose name still points to the locked file."""
    assert fcntl is not None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(
                f"another pipeline holds {root}: {describe_holder(holder)}; wait for it to finish or stop it "
                f"(its lock: {path})"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released (and removed) the file between our open and flock: again


@contextlib.contextmanager
def pipeline_lock(
    root: Path, command: Sequence[str] | None = None, say: Callable[[str], None] | None = None
) -> Iterator[Path]:
    """Hold `{root}/.pipeline.lock` for the body (creating `root`); `LockHeld` if another process does.

    `command` is recorded for the message another pipeline prints (default: this process's argv); `say`
    prints the stale-lock notice (default: stdout).
    """
    say = say or (lambda text: print(text, flush=True))
    path = root / LOCK_NAME
    key = str(path.resolve())
    if key in _HELD:  # this process holds it already (study → pipeline.main)
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    if fcntl is None:  # pragma: no cover - not POSIX
        say(f"[pipeline] no file locking on this platform: make sure no other pipeline uses {root}")
        yield path
        return
    root.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, root)
    try:
        stale = _read_holder(fd)
        if stale:
            say(f"[pipeline] taking over the stale lock {path}: {describe_holder(stale)} has ended")
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(command if command is not None else sys.argv),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD[key] = 1
        try:
            yield path
        finally:
            del _HELD[key]
            path.unlink(missing_ok=True)  # while still locked: a newcomer creates a fresh file
    finally:
        os.close(fd)
