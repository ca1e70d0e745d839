"""Run pipeline steps as `diffinject` subprocesses: skip finished ones, resume or rebuild the rest.

A step is skipped when its artifact exists and the config stored beside it (`.pipeline_done.json`) equals
the resolved one. When the config changed, or a step upstream of it was rebuilt in this invocation, its
folder is cleared first (a stale synthetic set must never mix with a new one). Independent steps may run
side by side (`jobs` > 1, for several CPU cores); a step waits for its upstream steps.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_NAME = "pipeline_config.yaml"
MARKER_NAME = ".pipeline_done.json"
#: seconds between progress lines of a step whose output goes to its log
HEARTBEAT_S = 60
#: a progress-bar line (tqdm / rich) in a step's log
PROGRESS = re.compile(r"\d+%\||it/s|s/it|\d+/\d+ ")


@dataclass
class Step:
    """One stage (a short chain of CLI calls) that produces `artifact` inside `folder`."""

    stage: str
    seed: int | None
    folder: Path
    commands: list[list[str]]
    artifact: Path
    config: dict[str, Any]
    upstream: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.stage if self.seed is None else f"seed{self.seed}/{self.stage}"


class StepFailed(RuntimeError):
    """A step's command exited non-zero (or its upstream failed)."""


def write_configs(step: Step) -> None:
    """Write the resolved YAML(s) the step's commands read (`{"fit": …, "topk": …}` for the bias step)."""
    step.folder.mkdir(parents=True, exist_ok=True)
    if step.stage == "bias":
        (step.folder / "topk").mkdir(parents=True, exist_ok=True)
        (step.folder / CONFIG_NAME).write_text(yaml.safe_dump(step.config["fit"], sort_keys=False))
        (step.folder / "topk" / CONFIG_NAME).write_text(yaml.safe_dump(step.config["topk"], sort_keys=False))
    else:
        (step.folder / CONFIG_NAME).write_text(yaml.safe_dump(step.config, sort_keys=False))


def is_complete(step: Step) -> bool:
    """Artifact present, nothing half-merged, and produced by the same resolved config."""
    marker = step.folder / MARKER_NAME
    if not step.artifact.is_file() or not marker.is_file():
        return False
    if step.stage == "inject" and any(step.folder.glob("manifest.rank*.csv")):
        return False
    return json.loads(marker.read_text()).get("config") == step.config


def drop_resume(command: list[str]) -> list[str]:
    """A fit command without `--ckpt_path` (its checkpoint folder was cleared)."""
    if command and command[0] == "fit" and "--ckpt_path" in command:
        at = command.index("--ckpt_path")
        return command[:at] + command[at + 2 :]
    return command


class Runner:
    """Executes steps in dependency order with up to `jobs` at once; records wall seconds per step."""

    def __init__(
        self, steps: Sequence[Step], timings_path: Path, dry_run: bool = False, jobs: int = 1
    ) -> None:
        self.steps = list(steps)
        self.timings_path = timings_path
        self.dry_run = dry_run
        self.jobs = max(1, jobs)
        self.rebuilt: set[str] = set()
        self.lock = threading.Lock()
        self.futures: dict[str, Future[None]] = {}
        self.timings: dict[str, float] = (
            json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        )

    def say(self, step: Step, text: str) -> None:
        number = self.steps.index(step) + 1
        print(f"[pipeline {number}/{len(self.steps)}] {step.key}: {text}", flush=True)

    def run(self) -> dict[str, float]:
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            # Submission order = plan order; a step's upstream is always planned (so picked up) before it.
            for step in self.steps:
                self.futures[step.key] = pool.submit(self.execute, step)
        failed = [key for key, future in self.futures.items() if future.exception() is not None]
        if failed:
            first = self.futures[failed[0]].exception()
            raise StepFailed(f"pipeline steps failed: {', '.join(failed)}") from first
        return self.timings

    def execute(self, step: Step) -> None:
        for name in step.upstream:
            if name in self.futures and self.futures[name].exception() is not None:
                self.say(step, f"not run: upstream {name} failed")
                raise StepFailed(f"{step.key}: upstream {name} failed")
        with self.lock:
            stale = [name for name in step.upstream if name in self.rebuilt]
        if not stale and is_complete(step):
            self.say(step, f"done, skipped ({step.artifact})")
            return
        if step.folder.exists() and (stale or (step.folder / MARKER_NAME).is_file()):
            why = f"upstream {', '.join(stale)} rebuilt" if stale else "its config changed"
            self.say(step, f"{why}, clearing {step.folder}")
            if not self.dry_run:
                shutil.rmtree(step.folder)
                step.commands = [drop_resume(c) for c in step.commands]
        self.say(step, "running")
        start = time.perf_counter()
        if not self.dry_run:
            write_configs(step)
        for command in step.commands:
            self.run_command(step, command)
        elapsed = round(time.perf_counter() - start, 1)
        if not self.dry_run:
            if not step.artifact.is_file():
                raise StepFailed(f"{step.key}: finished without writing {step.artifact}")
            marker = {"config": step.config, "seconds": elapsed}
            (step.folder / MARKER_NAME).write_text(json.dumps(marker, indent=1) + "\n")
        with self.lock:
            self.rebuilt.add(step.key)
            if not self.dry_run:
                self.timings[step.key] = elapsed
                self.timings_path.parent.mkdir(parents=True, exist_ok=True)
                text = json.dumps(self.timings, indent=2, sort_keys=True) + "\n"
                self.timings_path.write_text(text)
        self.say(step, f"finished in {elapsed:.0f} s")

    def run_command(self, step: Step, command: list[str]) -> None:
        """One CLI call; with several jobs its output goes to the step's log instead of the terminal."""
        line = f"diffinject {shlex.join(command)}"
        print(f"  $ {line}", flush=True)
        if self.dry_run:
            return
        argv = [sys.executable, "-m", "diffinject", *command]
        if self.jobs == 1:
            result = subprocess.run(argv)
            log_note = ""
        else:
            log = step.folder / "pipeline.log"
            with log.open("a") as handle:
                handle.write(f"$ {line}\n")
                handle.flush()
                result = self.wait_with_heartbeat(
                    step, subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT), log
                )
            log_note = f"; last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-25:])
        if result.returncode != 0:
            self.say(step, f"FAILED (exit {result.returncode}): {line}{log_note}")
            raise StepFailed(f"{step.key}: `{line}` exited with {result.returncode}")

    def wait_with_heartbeat(
        self, step: Step, process: subprocess.Popen, log: Path
    ) -> subprocess.CompletedProcess:
        """Wait for a logged command, printing its latest progress-bar line every `HEARTBEAT_S` seconds."""
        started = time.perf_counter()
        while True:
            try:
                code = process.wait(timeout=HEARTBEAT_S)
                return subprocess.CompletedProcess(process.args, code)
            except subprocess.TimeoutExpired:
                tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
                bars = [t.strip() for t in re.split(r"[\r\n]", tail) if PROGRESS.search(t)]
                latest = f" | {bars[-1][:150]}" if bars else f" (output: {log})"
                self.say(step, f"running for {time.perf_counter() - started:.0f} s{latest}")


def run_steps(
    steps: Sequence[Step], timings_path: Path, dry_run: bool = False, jobs: int = 1
) -> dict[str, float]:
    """Run what is missing; returns wall seconds per step (this run's and earlier ones')."""
    return Runner(steps, timings_path, dry_run, jobs).run()
