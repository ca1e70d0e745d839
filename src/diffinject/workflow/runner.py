"""Run pipeline steps as `diffinject` subprocesses: skip finished ones, resume or rebuild the rest.

Everything is decided from what is on disk (`workflow.markers`), so it holds across invocations:
- a step is **skipped** when its artifact exists and its done record has the resolved config, the current
  identities of its upstream stages (config + output bytes) and the same external inputs;
- an **interrupted** step (started record, no done record) **resumes** — a fit from `checkpoints/last.ckpt`,
  the injection writer from the images already written — only when its started record has the same config
  and upstream identities;
- anything else in the folder is **cleared** first (a stale synthetic set must never mix with a new one).
Independent steps may run side by side (`jobs` > 1, for several CPU cores); a step waits for its upstream
steps. Failed steps are collected (`Runner.failures`) for a one-screen summary. A step's output goes whole to
its folder's `pipeline.log`; the terminal gets one line per stage, heartbeats and real warnings
(`workflow.stage_output`), or, with `verbose`, the stage output as it comes.
"""

from __future__ import annotations

import codecs
import os
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
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from diffinject.workflow.markers import (
    DONE_NAME,
    STARTED_NAME,
    clean_temporary,
    done_record,
    input_fingerprints,
    read_record,
    same_content,
    stage_identity,
    write_json_atomic,
)
from diffinject.workflow.stage_output import HEARTBEAT_S as HEARTBEAT_S
from diffinject.workflow.stage_output import LogTail, Terminal, watch

CONFIG_NAME = "pipeline_config.yaml"
MARKER_NAME = DONE_NAME
#: the line of a log that names the error (a Python exception line, or Lightning's / our error prefixes)
ERROR_LINE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Interrupt)\b|^error:|FAILED|Traceback", re.IGNORECASE)
#: lines of a failed step's log printed with its failure (the whole log stays in the stage folder)
FAILURE_TAIL = 25


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
    #: files outside the run the step reads (e.g. a given diffusion export): a change rebuilds the step
    inputs: list[Path] = field(default_factory=list)
    #: run alone, before the pool starts, with `threads` intra-op threads (None: the caller's environment).
    #: For the CPU's long pole (the diffusion model): on 2 cores one process with 2 threads trains 1.7×
    #: as fast as with one, and a fixed thread count keeps its numbers reproducible run to run (a count
    #: switched mid-run when the other core frees up would make the weights depend on timing).
    exclusive: bool = False
    threads: int | None = None

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


@dataclass
class Failure:
    """Why a step did not finish, for the summary: the log to read and its last error line."""

    reason: str
    log: Path | None = None
    error_line: str = ""


def last_error_line(log: Path) -> str:
    """The last line of a log that names an error (else its last non-empty line).

    jsonargparse wraps a module's own error in "Does not validate against any of the Union subtypes" and
    lists the real one below as "- …"; that first listed error is appended.
    """
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    named = [
        i for i, line in enumerate(lines) if ERROR_LINE.search(line) and not line.startswith("Traceback")
    ]
    if not named:
        return (lines or [""])[-1][:300]
    line = lines[named[-1]]
    listed = [later[2:] for later in lines[named[-1] + 1 :] if later.startswith("- ")]
    return (f"{line} | {listed[0]}" if listed else line)[:300]


def upstream_identities(step: Step, root: Path) -> dict[str, str | None]:
    """Identity of each upstream stage as it is on disk now (`{root}/{key}`)."""
    return {key: stage_identity(root / key, key.rsplit("/", 1)[-1]) for key in step.upstream}


def record_mismatch(record: dict[str, Any], step: Step, upstream: dict[str, str | None]) -> str | None:
    """What differs between a stage record and what the step would run now (None: nothing)."""
    if record.get("config") != step.config:
        return "its config changed"
    recorded = record.get("upstream", {})
    keys = [*upstream, *(key for key in recorded if key not in upstream)]
    changed = [key for key in keys if recorded.get(key) != upstream.get(key)]
    if changed:
        return f"upstream {', '.join(changed)} rebuilt"
    if not same_content(record.get("inputs"), input_fingerprints(step.inputs, record.get("inputs"))):
        return f"its input {', '.join(map(str, step.inputs))} changed"
    return None


def is_complete(step: Step, upstream: dict[str, str | None]) -> bool:
    """Artifact present, nothing half-merged, produced by the same config from the same upstream outputs."""
    record = read_record(step.folder / MARKER_NAME)
    if not step.artifact.is_file() or record is None:
        return False
    if step.stage == "inject" and any(step.folder.glob("manifest.rank*.csv")):
        return False
    return record_mismatch(record, step, upstream) is None


def stale_reason(step: Step, upstream: dict[str, str | None]) -> str | None:
    """Why an existing stage folder cannot be kept or resumed (None: resume it)."""
    done = read_record(step.folder / MARKER_NAME)
    record = done or read_record(step.folder / STARTED_NAME)
    if record is None:
        return "no record of how it was started"
    why = record_mismatch(record, step, upstream)
    return why if why is not None or done is None else "its outputs changed"


def drop_resume(command: list[str]) -> list[str]:
    """A fit command without `--ckpt_path` (its checkpoint folder was cleared)."""
    if command and command[0] == "fit" and "--ckpt_path" in command:
        at = command.index("--ckpt_path")
        return command[:at] + command[at + 2 :]
    return command


def tee_stderr(process: subprocess.Popen, handle: Any) -> int:
    """Copy a process's stderr to ours and to `handle` as it comes; returns the exit code."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    assert process.stderr is not None
    for chunk in iter(lambda: process.stderr.read1(1 << 16), b""):
        text = decode.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        handle.write(text)
        handle.flush()
    return process.wait()


class Runner:
    """Executes steps in dependency order with up to `jobs` at once; records wall seconds per step."""

    def __init__(
        self,
        steps: Sequence[Step],
        timings_path: Path,
        dry_run: bool = False,
        jobs: int = 1,
        root: Path | None = None,
        verbose: bool = False,
    ) -> None:
        self.steps = list(steps)
        self.timings_path = timings_path
        self.root = root if root is not None else timings_path.parent
        self.failures: dict[str, Failure] = {}
        #: how a step's command is run (tests swap in a small script)
        self.executable = [sys.executable, "-m", "diffinject"]
        self.dry_run = dry_run
        self.jobs = max(1, jobs)
        self.rebuilt: set[str] = set()
        self.lock = threading.Lock()
        self.futures: dict[str, Future[None]] = {}
        self.timings: dict[str, float] = read_record(timings_path) or {}
        #: every line of each step's output on the terminal too: as it comes with one job (bars drawn), after
        #: the step's name with several
        self.verbose = verbose
        self.terminal = Terminal()

    @property
    def streams(self) -> bool:
        """Whether stage output goes to the terminal as it comes (else: to its log, picked lines shown)."""
        return self.verbose and self.jobs == 1

    def say(self, step: Step, text: str, file: Any = None) -> None:
        number = self.steps.index(step) + 1
        print(f"[pipeline {number}/{len(self.steps)}] {step.key}: {text}", file=file, flush=True)

    def run(self) -> dict[str, float]:
        alone = [step for step in self.steps if step.exclusive]
        for step in alone:  # no upstream (checked by the caller), nothing else running
            future: Future[None] = Future()
            self.futures[step.key] = future
            try:
                self.execute(step)
                future.set_result(None)
            except StepFailed as error:
                future.set_exception(error)
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            # Submission order = plan order; a step's upstream is always planned (so picked up) before it.
            for step in self.steps:
                if not step.exclusive:
                    self.futures[step.key] = pool.submit(self.execute, step)
        failed = [key for key, future in self.futures.items() if future.exception() is not None]
        if failed:
            first = self.futures[failed[0]].exception()
            raise StepFailed(f"pipeline steps failed: {', '.join(failed)}") from first
        return self.timings

    def execute(self, step: Step) -> None:
        try:
            self._execute(step)
        except StepFailed as error:
            with self.lock:
                self.failures.setdefault(step.key, Failure(str(error)))
            raise

    def _execute(self, step: Step) -> None:
        for name in step.upstream:
            if name in self.futures and self.futures[name].exception() is not None:
                self.say(step, f"not run: upstream {name} failed")
                raise StepFailed(f"not run: upstream {name} failed")
        upstream = upstream_identities(step, self.root)
        with self.lock:  # a dry run writes nothing, so an upstream it would rebuild is remembered here
            planned = [name for name in step.upstream if name in self.rebuilt] if self.dry_run else []
        if not planned and is_complete(step, upstream):
            self.say(step, f"done, skipped ({step.artifact})")
            return
        if step.folder.is_dir():
            why = f"upstream {', '.join(planned)} rebuilt" if planned else stale_reason(step, upstream)
            if why is None:
                self.say(step, "resuming an interrupted run (same config and upstream)")
                if not self.dry_run:
                    clean_temporary(step.folder)
            else:
                self.say(step, f"{why}, clearing {step.folder}")
                if not self.dry_run:
                    shutil.rmtree(step.folder)
                    step.commands = [drop_resume(c) for c in step.commands]
        where = "" if self.streams or self.dry_run else f" (output: {step.folder / 'pipeline.log'})"
        self.say(step, f"running{where}")
        start = time.perf_counter()
        inputs = input_fingerprints(step.inputs)
        if not self.dry_run:
            write_configs(step)
            started = {"config": step.config, "upstream": upstream, "inputs": inputs}
            write_json_atomic(step.folder / STARTED_NAME, started)
        for command in step.commands:
            self.run_command(step, command)
        elapsed = round(time.perf_counter() - start, 1)
        if not self.dry_run:
            if not step.artifact.is_file():
                raise StepFailed(f"finished without writing {step.artifact}")
            record = done_record(step.config, elapsed, upstream, inputs, step.folder, step.stage)
            write_json_atomic(step.folder / MARKER_NAME, record)
            (step.folder / STARTED_NAME).unlink(missing_ok=True)
        with self.lock:
            self.rebuilt.add(step.key)
            if not self.dry_run:
                self.timings[step.key] = elapsed
                write_json_atomic(self.timings_path, self.timings)
        self.say(step, f"finished in {elapsed:.0f} s")

    def run_command(self, step: Step, command: list[str]) -> None:
        """One CLI call, its output appended to the step's `pipeline.log`.

        Streaming (`verbose`, one job), the output also reaches the terminal (stdout as is, so progress bars
        work; stderr through a tee). Otherwise the command writes to the log only, and `stage_output.watch`
        shows what matters from it, a heartbeat, and on failure the log's last lines.
        """
        line = f"diffinject {shlex.join(command)}"
        print(f"  $ {line}", flush=True)
        if self.dry_run:
            return
        argv = [*self.executable, *command]
        env = None
        if step.threads is not None:
            env = {**os.environ, "OMP_NUM_THREADS": str(step.threads), "MKL_NUM_THREADS": str(step.threads)}
        log = step.folder / "pipeline.log"
        with log.open("a") as handle:
            handle.write(f"$ {line}\n")
            handle.flush()
            if self.streams:
                code = tee_stderr(subprocess.Popen(argv, stderr=subprocess.PIPE, env=env), handle)
            else:
                tail = LogTail(log, handle.tell())
                process = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT, env=env)
                code = watch(process, tail, self.terminal, partial(self.say, step), echo=self.verbose)
        if code != 0:
            if self.streams:  # the error is on the terminal already
                self.say(step, f"FAILED (exit {code}): {line}")
            else:
                lines = re.split(r"\r\n|\r|\n", log.read_text(errors="replace").rstrip())
                tail = "\n".join(lines[-FAILURE_TAIL:])
                self.say(step, f"FAILED (exit {code}): {line}; last lines of {log}:\n{tail}", file=sys.stderr)
            with self.lock:
                self.failures[step.key] = Failure(f"`{line}` exited with {code}", log, last_error_line(log))
            raise StepFailed(f"{step.key}: `{line}` exited with {code}")


def run_steps(
    steps: Sequence[Step], timings_path: Path, dry_run: bool = False, jobs: int = 1, verbose: bool = False
) -> dict[str, float]:
    """Run what is missing; returns wall seconds per step (this run's and earlier ones')."""
    return Runner(steps, timings_path, dry_run, jobs, verbose=verbose).run()


def failure_summary(runner: Runner) -> str:
    """One screen: each failed step, why, where its log is and the last error line in it."""
    lines = [f"[pipeline] {len(runner.failures)} step(s) did not finish:"]
    for key, failure in runner.failures.items():
        lines.append(f"  {key}: {failure.reason}")
        if failure.log is not None:
            lines.append(f"      log: {failure.log}")
        if failure.error_line:
            lines.append(f"      last error: {failure.error_line}")
    lines.append("[pipeline] fix the cause and run the same command again: finished steps are kept.")
    return "\n".join(lines)
