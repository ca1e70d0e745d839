"""One pipeline per run root (`workflow.lock`): a second one stops before touching any stage and names the
holder; a lock left by a killed pipeline is taken over; `make study` re-enters the lock it holds.

The holder is a real second process running `pipeline_lock`; the pipelines under test run `pipeline.main`
in-process with the step runner replaced by a recorder (the lock, not the stages, is under test).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from diffinject.workflow import pipeline, study
from diffinject.workflow.lock import LOCK_NAME, pipeline_lock

REPO = Path(__file__).resolve().parents[1]
HOLD = """
import sys
from pathlib import Path
from diffinject.workflow.lock import pipeline_lock
with pipeline_lock(Path(sys.argv[1]), ["make", "pipeline", "SEEDS=0"]):
    print("held", flush=True)
    sys.stdin.read()
"""


class RecordingRunner:
    """Stands in for `runner.Runner`: records that the steps would have run."""

    runs: list[list[str]] = []

    def __init__(self, steps, timings_path, dry_run=False, jobs=1, root=None) -> None:
        self.steps, self.dry_run, self.failures = steps, dry_run, {}

    def run(self) -> dict[str, float]:
        RecordingRunner.runs.append([step.key for step in self.steps])
        return {}


@pytest.fixture
def runs(monkeypatch) -> Iterator[list[list[str]]]:
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(pipeline, "Runner", RecordingRunner)
    RecordingRunner.runs = []
    yield RecordingRunner.runs


def hold(root: Path) -> subprocess.Popen:
    """Another process holding `root`'s lock until its stdin closes."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    return process


def release(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def test_a_second_pipeline_on_a_held_root_stops_and_names_the_holder(
    tmp_path: Path, runs: list[list[str]], capsys
) -> None:
    root = tmp_path / "runs" / "cmnist" / "1pct"
    argv = ["--runs", str(tmp_path / "runs"), "--seeds", "0", "--stages", "bias", "--no-report"]
    holder = hold(root)
    try:
        with pytest.raises(SystemExit) as exit_info:
            pipeline.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        expected = (
            rf"\[pipeline\] cannot start: another pipeline holds {re.escape(str(root))}: pid {holder.pid} on "
            rf"host {re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\S* "
            r"\(command: make pipeline SEEDS=0\); wait for it to finish or stop it"
        )
        assert re.search(expected, err), err
        assert runs == [] and not (root / "seed0").exists()
        pipeline.main([*argv, "--dry-run"])  # a dry run writes nothing and needs no lock
        assert runs == [["seed0/bias"]]
    finally:
        release(holder)
    pipeline.main(argv)  # the holder is gone: the same command runs
    assert runs[-1] == ["seed0/bias"] and not (root / LOCK_NAME).exists()


def test_a_lock_left_by_a_killed_pipeline_is_taken_over(
    tmp_path: Path, runs: list[list[str]], capsys
) -> None:
    root = tmp_path / "cmnist" / "1pct"
    holder = hold(root)
    holder.kill()  # kill -9: no cleanup, the lock file and its details stay
    release(holder)
    assert json.loads((root / LOCK_NAME).read_text())["pid"] == holder.pid
    pipeline.main(["--runs", str(tmp_path), "--seeds", "0", "--stages", "bias", "--no-report"])
    out = capsys.readouterr().out
    assert f"[pipeline] taking over the stale lock {root / LOCK_NAME}: pid {holder.pid} on host" in out
    assert "has ended" in out and runs == [["seed0/bias"]]
    assert not (root / LOCK_NAME).exists()


def test_the_lock_is_reentrant_and_study_holds_each_variant_root(
    tmp_path: Path, runs: list[list[str]], monkeypatch
) -> None:
    """`make study` holds a variant's root while linking, then runs the pipeline in-process on it."""
    root = tmp_path / "study" / "nogate" / "cmnist" / "1pct"
    argv = ["--runs", str(tmp_path / "study" / "nogate"), "--seeds", "0", "--stages", "bias", "--no-report"]
    with pipeline_lock(root, ["study"]):
        pipeline.main(argv)  # this process holds it: no deadlock, no refusal
        assert (root / LOCK_NAME).is_file()  # still held by the outer block
    assert runs == [["seed0/bias"]] and not (root / LOCK_NAME).exists()

    base = tmp_path / "cmnist" / "1pct"
    for folder in ("diffusion", "seed0/vanilla", "seed0/lff", "seed0/bias", "seed0/inject"):
        (base / folder).mkdir(parents=True)
    for name in (
        "inject/manifest.csv",
        "inject/manifest_accepted.csv",
        "bias/checkpoints/best.ckpt",
        "bias/topk.csv",
    ):
        (base / "seed0" / name).parent.mkdir(parents=True, exist_ok=True)
        (base / "seed0" / name).write_text("")
    real_main = pipeline.main
    seen: list[dict] = []

    def pipeline_main(argv: list[str]) -> None:
        seen.append(json.loads((root / LOCK_NAME).read_text()))
        real_main([*argv, "--no-report"])
        (root / "report").mkdir(parents=True)
        (root / "report" / "results.json").write_text(json.dumps({"methods": {}}))

    monkeypatch.setattr(pipeline, "main", pipeline_main)
    variant = tmp_path / "nogate.yaml"
    variant.write_text(yaml.safe_dump({"debias": {"model": {"init_args": {"lr": 0.01}}}}))
    study.main(["--runs", str(tmp_path), "--seeds", "0", "--", str(variant)])
    assert seen[0]["pid"] == os.getpid() and "diffinject.workflow.study" in seen[0]["command"]
    assert runs[-1] == ["seed0/debias"] and not (root / LOCK_NAME).exists()
