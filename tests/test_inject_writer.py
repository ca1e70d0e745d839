"""SyntheticImageWriter file handling without a trainer: atomic PNGs, shard merge, resume bookkeeping."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffinject.callbacks.synthetic_writer import (
    MANIFEST_COLUMNS,
    SyntheticImageWriter,
    collect_rows,
    remove_temp_files,
    save_png_atomic,
)


def _row(index: int, content: int = 1, style: int = 2) -> dict[str, object]:
    return {
        "index": index, "content_index": content, "style_index": style, "label": 3, "content_label": 3,
        "style_label": 5, "content_bias": 5, "style_bias": 5, "path": f"images/{index}.png",
    }  # fmt: skip


def _shard(path: Path, rows: list[dict[str, object]], torn_tail: bool = False) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        if torn_tail:
            handle.write("7,1,2,3")  # a crash in the middle of a line


def test_png_round_trip_and_no_temp_left(tmp_path: Path) -> None:
    rgb = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    gray = torch.randint(0, 256, (1, 5, 7), dtype=torch.uint8)
    save_png_atomic(rgb, tmp_path / "a.png")
    save_png_atomic(gray, tmp_path / "b.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), rgb.permute(1, 2, 0).numpy())
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), gray[0].numpy())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]
    with pytest.raises(ValueError, match="2-channel"):
        save_png_atomic(torch.zeros(2, 4, 4, dtype=torch.uint8), tmp_path / "c.png")


def test_merge_dedupes_drops_missing_and_clears_shards(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in (0, 1, 2, 4, 5):
        save_png_atomic(torch.zeros(3, 4, 4, dtype=torch.uint8), images / f"{i}.png")
    _shard(tmp_path / "manifest.csv", [_row(0), _row(1)])
    _shard(tmp_path / "manifest.rank0.csv", [_row(1), _row(2), _row(3)], torn_tail=True)  # 3: PNG missing
    _shard(tmp_path / "manifest.rank3.csv", [_row(4), _row(5)])  # from an earlier 4-process run
    assert sorted(collect_rows(tmp_path)) == [0, 1, 2, 4, 5]
    with pytest.warns(UserWarning, match="1 of 6 samples still missing"):
        rows = SyntheticImageWriter(str(tmp_path)).merge(expected=6)
    assert [int(r["index"]) for r in rows] == [0, 1, 2, 4, 5]
    assert not list(tmp_path.glob("manifest.rank*.csv"))
    with (tmp_path / "manifest.csv").open() as handle:
        merged = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in merged] == [0, 1, 2, 4, 5] and list(merged[0]) == list(MANIFEST_COLUMNS)


def test_merge_rebuilds_lost_rows_from_the_pairing(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for i in (0, 2):
        save_png_atomic(torch.zeros(3, 4, 4, dtype=torch.uint8), tmp_path / "images" / f"{i}.png")
    _shard(tmp_path / "manifest.rank0.csv", [_row(0)])

    def info(i: int) -> dict[str, object]:
        row = _row(i, content=10 + i)
        row.pop("path")
        return {**row, "noise_seed": 7}

    with pytest.warns(UserWarning, match="1 of 3"):
        rows = SyntheticImageWriter(str(tmp_path)).merge(expected=3, sample_info=info)
    assert [int(r["index"]) for r in rows] == [0, 2]
    assert int(rows[1]["content_index"]) == 12 and rows[1]["path"] == "images/2.png"


def test_remove_temp_files_touches_only_the_writers_temp_names(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    temps = [
        tmp_path / "images" / ".3.png.tmp812",
        tmp_path / ".manifest.csv.tmp9",
        tmp_path / ".settings.json.tmp",
    ]
    kept = [
        tmp_path / "images" / "3.png",
        tmp_path / "notes.tmp.txt",
        tmp_path / ".pipeline-tmp-done.json.12",  # the runner's marker temp: not ours
        tmp_path / "manifest.rank0.csv",
    ]
    for path in temps + kept:
        path.write_bytes(b"x")
    assert remove_temp_files(tmp_path) == 3
    assert not any(p.exists() for p in temps) and all(p.exists() for p in kept)
    assert remove_temp_files(tmp_path / "missing") == 0
