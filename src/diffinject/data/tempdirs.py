"""Files and folders built aside and renamed into place, and the temp folders a killed build leaves behind.

`write_text_atomic` / `write_json_atomic`: a reader sees the old file or the new one, never half of one (the
temp file is named after the target and the pid, so two writers never share one).

A build writes into a hidden sibling `.{name}.tmp-{host}-{pid}-{random}` and renames it when complete, so a
reader never sees half a dataset. A kill leaves the sibling; the next build of the same target removes it when
its process is gone (same host, pid not alive) or it is older than a day, and leaves a live build's alone.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("diffinject.data")

#: a temp folder older than this is stale even if its pid looks alive (pid reused, or another host's build)
STALE_TEMP_SECONDS = 24 * 3600


def _host() -> str:
    return socket.gethostname().replace("-", "_").replace(".", "_") or "host"


def _temp_name(target: Path, kind: str) -> Path:
    """`.{name}.{kind}-{host}-{pid}-{random}`: host and pid tell a killed build from a live one."""
    return target.parent / f".{target.name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _is_stale(folder: Path, prefix: str) -> bool:
    """A temp folder whose builder is gone: same host (or no host recorded) and its pid dead, or too old."""
    fields = folder.name[len(prefix) :].rsplit("-", 2)
    try:
        age = time.time() - folder.lstat().st_mtime
    except OSError:
        return False
    if age > STALE_TEMP_SECONDS:
        return True
    if len(fields) == 2:  # legacy `{pid}-{random}` (no host): judged as local
        pid_text, same_host = fields[0], True
    elif len(fields) == 3:
        pid_text, same_host = fields[1], fields[0] == _host()
    else:
        return False
    return same_host and pid_text.isdigit() and not _pid_alive(int(pid_text))


def clean_stale_temps(target: Path) -> list[Path]:
    """Delete the temp siblings (`.{name}.tmp-*`, `.{name}.old-*`) that a killed build of `target` left;
    an old copy set aside by an interrupted replacement is put back when `target` is missing."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        prefix = f".{target.name}.{kind}-"
        for folder in sorted(target.parent.glob(f"{glob.escape(prefix)}*")):
            if not (folder.is_dir() and _is_stale(folder, prefix)):
                continue
            if kind == "old" and not target.exists():  # killed mid-swap: the previous version comes back
                os.rename(folder, target)
                log.warning("restored %s from %s (a replacement was interrupted)", target, folder.name)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.warning(
            "removed %d temporary folder(s) left by an interrupted build of %s: %s",
            len(removed),
            target,
            ", ".join(p.name for p in removed),
        )
    return removed


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path | None]:
    """Build a folder in a temporary sibling and rename it to `target` when the block succeeds.

    Yields None when `target` already exists (nothing to do). If another process renames first, the fresh copy
    is discarded and the existing one kept, so concurrent builders never leave a half-written dataset. Temp
    folders of killed builds are removed first (`clean_stale_temps`).
    """
    clean_stale_temps(target)
    if target.exists():
        yield None
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            log.info("%s was built concurrently by another process; keeping that copy", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def replacing_directory(target: Path) -> Iterator[Path]:
    """Build a new `target` in a temporary sibling; only when the block succeeds does it replace the old one.

    The old folder is renamed aside, the new one into place, then the old one deleted: a failing or killed
    build never costs the folder that was there (what `--overwrite` of an export needs).
    """
    clean_stale_temps(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = _temp_name(target, "old") if target.exists() else None
        if old is not None:
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: Path, text: str, tmp_prefix: str = ".") -> None:
    """Write `text` to a sibling `{tmp_prefix}{name}.{pid}.tmp`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{tmp_prefix}{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, payload: Any, tmp_prefix: str = ".") -> None:
    """`payload` as indented, key-sorted JSON (non-JSON values as `str`), written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", tmp_prefix)
