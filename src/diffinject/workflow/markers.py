"""What a stage folder says about itself: started / done records, and the identity of what it produced.

A finished stage writes `.pipeline_done.json`: the resolved config it ran, the identities of the upstream
stages it consumed, fingerprints of external inputs (a given diffusion export) and of its own outputs. A
stage's **identity** is a hash of its config and the bytes of its outputs (`STAGE_OUTPUTS`), so a
downstream stage can tell from disk alone — in any later invocation — that its upstream was rebuilt or
replaced since it ran. Output hashes are cached in the record by (size, mtime), so a skipped pipeline does
not re-hash a 400 MB UNet every time.

`.pipeline_started.json` is written before a stage's commands run (config + upstream identities): an
interrupted stage resumes only when both still match. Records are written atomically (temporary file +
rename); an unreadable record counts as absent ("not done" / "not resumable").
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from diffinject.data.tempdirs import write_json_atomic as write_json

DONE_NAME = ".pipeline_done.json"
STARTED_NAME = ".pipeline_started.json"
#: files (globs relative to the stage folder) whose bytes define what a stage hands downstream
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "bias": ("checkpoints/best.ckpt", "topk.csv"),
    "diffusion": ("unet/*.safetensors", "unet/*.bin", "unet/config.json", "unet/diffusion_info.json"),
    "inject": ("manifest.csv", "manifest_accepted.csv", "images/*.png"),
    # the inject gate's premise check reads the Vanilla model (a missing one stops the run before it starts)
    "vanilla": ("checkpoints/best.ckpt", "metrics.json"),
    # the generative baselines (workflow.generative): generator exports and the images they render
    **dict.fromkeys(
        ("a2_source", "a2_adapt", "a2_nocdc_adapt", "amplibias_gan"),
        ("generator/gan_info.json", "generator/*.safetensors"),
    ),
    **dict.fromkeys(
        ("a2_translate", "a2_nocdc_translate", "amplibias_generate"), ("manifest.csv", "images/*.png")
    ),
}
DEFAULT_OUTPUTS = ("metrics.json",)
TMP_PREFIX = ".pipeline-tmp-"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a record atomically; a kill leaves only a `TMP_PREFIX` file, which `clean_temporary` removes."""
    write_json(path, data, tmp_prefix=TMP_PREFIX)


def read_record(path: Path) -> dict[str, Any] | None:
    """A record as a dict, or None when it is missing, truncated or not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clean_temporary(folder: Path) -> list[Path]:
    """Remove record files a kill left half-written (their names start with `TMP_PREFIX`)."""
    removed = [path for path in folder.glob(f"{TMP_PREFIX}*") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprints(files: Iterable[Path], known: dict[str, Any] | None = None) -> dict[str, list]:
    """{path: [size, mtime_ns, sha256]}; a hash in `known` is reused when size and mtime still match."""
    known = known or {}
    result: dict[str, list] = {}
    for path in sorted(files):
        stat = path.stat()
        cached = known.get(str(path))
        if isinstance(cached, list) and len(cached) == 3 and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
            result[str(path)] = cached
        else:
            result[str(path)] = [stat.st_size, stat.st_mtime_ns, _sha256(path)]
    return result


def output_files(folder: Path, stage: str) -> list[Path]:
    """The files of `STAGE_OUTPUTS[stage]` present in `folder` (symlinked folders are followed)."""
    found: set[Path] = set()
    for pattern in STAGE_OUTPUTS.get(stage, DEFAULT_OUTPUTS):
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def identity_of(config: Any, prints: dict[str, list], folder: Path) -> str:
    """Hash of a config and the content hashes of its outputs (paths relative to the stage folder)."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for path, (_, _, sha) in sorted(prints.items()):
        digest.update(f"\n{os.path.relpath(path, folder)}={sha}".encode())
    return digest.hexdigest()


def stage_identity(folder: Path, stage: str) -> str | None:
    """The identity of a finished stage as it is on disk now (None: not finished or unreadable)."""
    record = read_record(folder / DONE_NAME)
    if record is None or "config" not in record:
        return None
    prints = fingerprints(output_files(folder, stage), record.get("outputs"))
    return identity_of(record["config"], prints, folder)


def input_fingerprints(paths: Sequence[Path], known: dict[str, Any] | None = None) -> dict[str, list]:
    """Fingerprints of external inputs (e.g. a given diffusion export's weights); missing → 'missing'."""
    prints = fingerprints([p for p in paths if p.is_file()], known)
    return {str(p): prints.get(str(p), [0, 0, "missing"]) for p in paths}


def same_content(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Two fingerprint maps name the same files with the same hashes (sizes and times aside)."""

    def hashes(prints: dict[str, Any] | None) -> dict[str, Any]:
        return {path: value[2] if isinstance(value, list) and len(value) == 3 else value
                for path, value in (prints or {}).items()}  # fmt: skip

    return hashes(a) == hashes(b)


def done_record(
    config: Any,
    seconds: float,
    upstream: dict[str, str | None],
    inputs: dict[str, list],
    folder: Path,
    stage: str,
) -> dict[str, Any]:
    prints = fingerprints(output_files(folder, stage))
    return {
        "config": config,
        "seconds": seconds,
        "upstream": upstream,
        "inputs": inputs,
        "outputs": prints,
        "identity": identity_of(config, prints, folder),
    }
