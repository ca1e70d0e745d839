"""Folder splits decoded once (issue 20 §3): in memory under the cap, as a memory-mapped array file above it
(re-read when the tree changes, per-item decode when it cannot be written); entries that are not regular
files (a FIFO) skipped and named; a damaged test image named by the pipeline's preflight before any fit."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import threading
from pathlib import Path

import pytest
import torch

from diffinject.data import decoded
from diffinject.data.datasets import BadImageError, ImageFileDataset
from diffinject.data.decoded import ArrayFile, DecodedImageDataset
from diffinject.data.inspect import inspect_folder
from diffinject.workflow import pipeline
from diffinject.workflow.configs import Options
from diffinject.workflow.preflight import CannotStart, check_dataset
from test_data_folder import _dm, _png, make_tree
from test_pipeline_folder import REPO, write_tree

TINY_CAP = 1e-9  # GiB: every split goes to the array file


def _items(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(_items(a), _items(b), strict=True):
        assert torch.equal(x["image"], y["image"]) and (x["label"], x["bias"], x["index"]) == (
            y["label"],
            y["bias"],
            y["index"],
        )


def _setup(dm):
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("cap", [2.0, TINY_CAP])
def test_decoded_once_equals_per_item_decode(tmp_path: Path, cap: float) -> None:
    make_tree(tmp_path, size=8)  # resized 8 -> 16 on decode
    once = _setup(_dm(tmp_path, memory_cap_gib=cap))
    every = _setup(_dm(tmp_path, decode_once=False))
    assert isinstance(once.train_eval_dataset, DecodedImageDataset)
    assert type(every.train_eval_dataset) is ImageFileDataset
    held = once.train_eval_dataset.pixels
    assert isinstance(held, ArrayFile) if cap == TINY_CAP else isinstance(held, torch.Tensor)
    for split in ("train_eval_dataset", "val_dataset", "test_dataset"):
        _assert_same(getattr(once, split), getattr(every, split))
    assert once.train_dataset.pixels is held  # augmented and plain views share one decode
    for module in (once, every):  # the augmented view: same draws, same crops
        torch.manual_seed(0)
        module.batches = [b["image"] for b in module.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(once.batches, every.batches, strict=True))


def test_parallel_decode_in_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_tree(tmp_path)
    monkeypatch.setattr(decoded, "PARALLEL_MIN_FILES", 1)
    _assert_same(
        _setup(_dm(tmp_path, num_workers=2)).train_eval_dataset,
        _setup(_dm(tmp_path, decode_once=False)).train_eval_dataset,
    )


def test_array_file_is_reused_and_reread_after_an_edit(tmp_path: Path) -> None:
    dataset = make_tree(tmp_path)
    cache = dataset / ".diffinject-cache"
    first = _setup(_dm(tmp_path, memory_cap_gib=TINY_CAP)).train_eval_dataset
    files = sorted(p.name for p in cache.glob("*.npy"))
    assert [name.rsplit("-", 1)[0] for name in files] == ["1pct-train-3x16", "1pct-valid-3x16", "test-3x16"]
    assert len(pickle.dumps(first)) < 4000  # workers get the file's path, not its pixels
    stamp = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    again = _setup(_dm(tmp_path, memory_cap_gib=TINY_CAP))  # unchanged tree: the same files, not rewritten
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == stamp
    _assert_same(again.train_eval_dataset, first)

    edited = dataset / "1pct" / "align" / "0" / "1_0_0.png"
    _png(edited, size=12, seed=99)
    os.utime(edited, ns=(1, 1))  # a new mtime even on a coarse clock
    _png(dataset / "1pct" / "align" / "1" / "9_1_1.png", seed=7)  # and one file more
    edit = _setup(_dm(tmp_path, memory_cap_gib=TINY_CAP))
    reference = _setup(_dm(tmp_path, decode_once=False))
    _assert_same(edit.train_eval_dataset, reference.train_eval_dataset)
    assert len(edit.train_eval_dataset) == 7
    assert not torch.equal(edit.train_eval_dataset[1]["image"], first[1]["image"])
    trains = sorted(cache.glob("1pct-train-*.npy"))
    assert len(trains) == 1 and trains[0].name not in files  # the old key was removed


def test_unwritable_cache_falls_back_to_per_item_decode(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_tree(tmp_path)
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder's parent should be")
    with caplog.at_level(logging.WARNING, logger="diffinject.data"):
        dm = _setup(_dm(tmp_path, memory_cap_gib=TINY_CAP, cache_dir=str(blocker / "cache")))
    assert type(dm.train_eval_dataset) is ImageFileDataset
    notes = [r.getMessage() for r in caplog.records if "no decode cache" in r.getMessage()]
    assert len(notes) == 3 and "memory_cap_gib=1e-09" in notes[0] and "set cache_dir" in notes[0]
    _assert_same(dm.train_eval_dataset, _setup(_dm(tmp_path, decode_once=False)).train_eval_dataset)


@pytest.mark.parametrize("cap", [2.0, TINY_CAP])
def test_damaged_pixels_still_raise_when_served_and_are_never_cached(tmp_path: Path, cap: float) -> None:
    dataset = make_tree(tmp_path)
    broken = dataset / "1pct" / "align" / "1" / "4_1_1.png"
    broken.write_bytes(broken.read_bytes()[:-30])
    dm = _dm(tmp_path, augment=False, memory_cap_gib=cap)
    dm.setup("fit")  # headers pass, as before: the file is named when served
    with pytest.raises(BadImageError, match="4_1_1.png.*on_bad_image='skip'"):
        dm.train_eval_dataset[4]
    assert dm.train_eval_dataset[3]["index"] == 3
    assert not list((dataset / ".diffinject-cache").glob("1pct-train-*.npy"))


def test_memory_cap_is_validated() -> None:
    with pytest.raises(ValueError, match="memory_cap_gib must be >= 0"):
        _dm(Path("nowhere"), memory_cap_gib=-1)


def _within(seconds: float, work, fifos: list[Path]) -> None:
    """Run `work` in a thread; a FIFO opened for reading would block it forever, so it must end in time."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as error:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:  # let a blocked reader go before failing
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {seconds} s: a FIFO was opened")
    if errors:
        raise errors[0]


def test_fifo_named_like_an_image_is_skipped_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dataset = make_tree(tmp_path)
    fifos = [dataset / "1pct" / "align" / "0" / "99_0_0.png", dataset / "test" / "x.png"]
    for fifo in fifos:
        os.mkfifo(fifo)
    dm = _dm(tmp_path)
    with caplog.at_level(logging.WARNING, logger="diffinject.data"):
        _within(30, lambda: _setup(dm), fifos)
        _within(30, lambda: inspect_folder(tmp_path, "toy_set", "1pct"), fifos)
    assert len(dm.train_eval_dataset) == 6 and len(dm.test_dataset) == 4
    notes = [r.getMessage() for r in caplog.records if "not regular files" in r.getMessage()]
    assert any("skipped 1 item(s)" in n and "99_0_0.png" in n and "training split" in n for n in notes)
    assert any("skipped 1 item(s)" in n and "x.png" in n and "test split" in n for n in notes)


def _folder_options(tmp_path: Path, **extra) -> Options:
    return Options(
        dataset="folder", name="bars", pct="5pct", seeds=[0], runs=str(tmp_path / "runs"),
        data_root=str(tmp_path / "data"), configs=str(REPO / "configs"), **extra,
    )  # fmt: skip


def test_preflight_decodes_the_test_split(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dataset = write_tree(tmp_path / "data")
    check_dataset(_folder_options(tmp_path))  # a sound tree passes
    broken = dataset / "test" / "1" / next(p.name for p in (dataset / "test" / "1").iterdir())
    broken.write_bytes(broken.read_bytes()[:-30])  # header intact, pixel data cut
    with pytest.raises(CannotStart, match=rf"1 test image\(s\) .* do not decode.*\n.*{broken.name}"):
        check_dataset(_folder_options(tmp_path))
    argv = ["--dataset", "folder", "--name", "bars", "--pct", "5pct", "--data-root", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as stop:  # before any stage: no run folder, exit code 2
        pipeline.main([*argv, "--seeds", "0", "--runs", str(tmp_path / "runs"), "--stages", "bias"])
    assert stop.value.code == 2 and broken.name in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    variant = tmp_path / "skip.yaml"
    variant.write_text("bias:\n  data:\n    init_args:\n      on_bad_image: skip\n")
    check_dataset(_folder_options(tmp_path, variants=[str(variant)]))  # skip: named, not fatal
    assert "on_bad_image: skip drops them" in capsys.readouterr().out


@pytest.mark.parametrize(("workers", "cap"), [(0, 2.0), (2, 2.0), (0, TINY_CAP)])
def test_setup_leaves_the_global_rng_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int, cap: float
) -> None:
    """The training shuffles draw from the global generator after setup: a decode that drew from it (as a
    DataLoader does for its base seed) would change every number of the stage."""
    make_tree(tmp_path)
    monkeypatch.setattr(decoded, "PARALLEL_MIN_FILES", 1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _setup(_dm(tmp_path, num_workers=workers, memory_cap_gib=cap))
    assert torch.equal(torch.get_rng_state(), before)
