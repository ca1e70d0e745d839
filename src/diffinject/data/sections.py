"""Where the pieces of a stage config live, for code that edits or reads resolved configs."""

from __future__ import annotations

from typing import Any


def source_data_section(config: dict[str, Any]) -> dict[str, Any] | None:
    """The dataset's `{class_path, init_args}`; the injection pairs module nests it under `init_args.data`."""
    section = config.get("data")
    while isinstance(section, dict) and isinstance((section.get("init_args") or {}).get("data"), dict):
        section = section["init_args"]["data"]
    return section if isinstance(section, dict) and "class_path" in section else None
