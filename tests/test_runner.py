"""The step runner's promises, across invocations, with a stand-in CLI (a small script) instead of diffinject:
skip what is done, rebuild what is stale (own config, upstream rebuilt earlier or replaced on disk, external
input changed), resume only an interrupted run of the same config, survive a truncated record, summarise
failures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from diffinject.workflow.markers import DONE_NAME, STARTED_NAME, TMP_PREFIX, read_record
from diffinject.workflow.runner import Runner, Step, StepFailed, failure_summary, last_error_line

#: stand-in CLI: `write PATH TEXT` appends TEXT to PATH; `fail MESSAGE` prints an error and exits with 3.
SCRIPT = """
import sys
from pathlib import Path
args = [a for i, a in enumerate(sys.argv[1:]) if a != "--ckpt_path" and sys.argv[i] != "--ckpt_path"]
if args[0] == "fail":
    print("Traceback (most recent call last):", file=sys.stderr)
    print(f"ValueError: {args[1]}", file=sys.stderr)
    sys.exit(3)
while args:
    verb, path, text, *args = args
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(text)
"""


@pytest.fixture
def cli(tmp_path: Path) -> list[str]:
    script = tmp_path / "fake_cli.py"
    script.write_text(SCRIPT)
    return [sys.executable, str(script)]


def steps_of(root: Path, a_config: dict, b_config: dict, b_inputs: list[Path] | None = None) -> list[Step]:
    a, b = root / "a", root / "seed0" / "b"
    step_a = Step("a", None, a, [["write", str(a / "metrics.json"), "A"]], a / "metrics.json", a_config)
    step_b = Step("b", 0, b, [["write", str(b / "metrics.json"), "B"]], b / "metrics.json", b_config, ["a"])
    step_b.inputs = b_inputs or []
    return [step_a, step_b]


def run(root: Path, cli: list[str], steps: list[Step], jobs: int = 1) -> Runner:
    runner = Runner(steps, root / "timings.json", jobs=jobs, root=root)
    runner.executable = cli
    runner.run()
    return runner


def test_skips_what_is_done_and_rebuilds_a_changed_config(tmp_path: Path, cli: list[str], capsys) -> None:
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    assert (tmp_path / "seed0" / "b" / "metrics.json").read_text() == "B"
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    out = capsys.readouterr().out
    assert "a: done, skipped" in out and "seed0/b: done, skipped" in out
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 2}))
    assert "seed0/b: its config changed, clearing" in capsys.readouterr().out
    assert (
        tmp_path / "seed0" / "b" / "metrics.json"
    ).read_text() == "B"  # rebuilt from scratch, not appended
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert set(timings) == {"a", "seed0/b"}


def test_an_upstream_rebuilt_in_an_earlier_invocation_rebuilds_downstream(
    tmp_path: Path, cli: list[str], capsys
) -> None:
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    run(tmp_path, cli, steps_of(tmp_path, {"x": 2}, {"y": 1})[:1])  # only `a`, with a changed config
    run(tmp_path, cli, steps_of(tmp_path, {"x": 2}, {"y": 1}))  # then everything
    out = capsys.readouterr().out.split("[pipeline 1/2] a: its config changed")[-1]
    assert "a: done, skipped" in out and "seed0/b: upstream a rebuilt, clearing" in out


def test_an_upstream_output_replaced_on_disk_rebuilds_downstream(
    tmp_path: Path, cli: list[str], capsys
) -> None:
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    (tmp_path / "a" / "metrics.json").write_text("copied in from another run")
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    out = capsys.readouterr().out
    assert "seed0/b: upstream a rebuilt, clearing" in out
    assert "a: done, skipped" in out  # a replaced artifact is used as it is; what read the old one is rebuilt


def test_a_changed_external_input_rebuilds_the_step(tmp_path: Path, cli: list[str], capsys) -> None:
    weights = tmp_path / "export" / "model.safetensors"
    weights.parent.mkdir()
    weights.write_bytes(b"one")
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}, [weights]))
    weights.write_bytes(b"two")  # same path and config, other weights
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}, [weights]))
    assert f"seed0/b: its input {weights} changed, clearing" in capsys.readouterr().out


def interrupted(tmp_path: Path, config: dict) -> Path:
    """A `b` folder as a kill leaves it: started record, partial output, a half-written record file."""
    folder = tmp_path / "seed0" / "b"
    folder.mkdir(parents=True)
    (folder / STARTED_NAME).write_text(json.dumps({"config": config, "upstream": {"a": None}, "inputs": {}}))
    (folder / "partial.png").write_text("written before the kill")
    (folder / f"{TMP_PREFIX}{DONE_NAME}.123").write_text('{"conf')
    return folder


def test_an_interrupted_step_resumes_only_under_the_same_config(
    tmp_path: Path, cli: list[str], capsys
) -> None:
    steps = steps_of(tmp_path, {"x": 1}, {"y": 1})
    run(tmp_path, cli, steps[:1])
    identity = read_record(tmp_path / "a" / DONE_NAME)["identity"]
    folder = interrupted(tmp_path, {"y": 1})
    record = json.loads((folder / STARTED_NAME).read_text())
    (folder / STARTED_NAME).write_text(json.dumps(record | {"upstream": {"a": identity}}))
    steps[1].commands[0] += ["--ckpt_path", "last.ckpt"]  # what the plan adds for a fit with a last.ckpt
    run(tmp_path, cli, steps)
    assert "seed0/b: resuming an interrupted run" in capsys.readouterr().out
    assert (folder / "partial.png").is_file() and not list(folder.glob(f"{TMP_PREFIX}*"))
    assert not (folder / STARTED_NAME).exists() and read_record(folder / DONE_NAME) is not None

    import shutil

    shutil.rmtree(folder)
    folder = interrupted(tmp_path, {"y": "an older config"})
    steps = steps_of(tmp_path, {"x": 1}, {"y": 1})
    steps[1].commands = [["fit", "--ckpt_path", "last.ckpt"]]  # would resume the old run under the new config
    runner = Runner(steps, tmp_path / "timings.json", root=tmp_path)
    runner.executable = [*cli[:2]]
    with pytest.raises(StepFailed):  # the stand-in CLI does not know `fit`; what matters is the command
        runner.run()
    assert "its config changed, clearing" in capsys.readouterr().out
    assert not (folder / "partial.png").exists() and steps[1].commands == [["fit"]]


def test_a_truncated_done_record_means_not_done(tmp_path: Path, cli: list[str], capsys) -> None:
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    (tmp_path / "seed0" / "b" / DONE_NAME).write_text('{"config": {"y"')  # killed mid-write (old versions)
    run(tmp_path, cli, steps_of(tmp_path, {"x": 1}, {"y": 1}))
    assert "seed0/b: no record of how it was started, clearing" in capsys.readouterr().out
    assert read_record(tmp_path / "seed0" / "b" / DONE_NAME)["config"] == {"y": 1}


@pytest.mark.parametrize("jobs", [1, 2])
def test_failures_are_summarised_and_downstream_is_not_run(
    tmp_path: Path, cli: list[str], capsys, jobs: int
) -> None:
    steps = steps_of(tmp_path, {"x": 1}, {"y": 1})
    steps[0].commands = [["fail", "the data module could not find data/bffhq"]]
    runner = Runner(steps, tmp_path / "timings.json", jobs=jobs, root=tmp_path)
    runner.executable = cli
    with pytest.raises(StepFailed):
        runner.run()
    assert runner.failures["seed0/b"].reason == "not run: upstream a failed"
    failure = runner.failures["a"]
    assert failure.log == tmp_path / "a" / "pipeline.log"
    assert failure.error_line == "ValueError: the data module could not find data/bffhq"
    summary = failure_summary(runner)
    assert "2 step(s) did not finish" in summary and f"log: {failure.log}" in summary
    assert not (tmp_path / "a" / DONE_NAME).exists()
    if jobs == 1:  # the error also reached the terminal
        assert "ValueError: the data module" in capsys.readouterr().err


def test_last_error_line_prefers_the_exception(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_text(
        "Epoch 3: 100%|####|\nTraceback (most recent call last):\n  File x\nKeyError: 'label'\nbye\n"
    )
    assert last_error_line(log) == "KeyError: 'label'"
    log.write_text("only a line\n")
    assert last_error_line(log) == "only a line"


def test_an_exclusive_step_runs_first_and_alone_with_its_threads(tmp_path: Path) -> None:
    """The CPU pipeline's diffusion step: planned anywhere, it runs before the pool with OMP_NUM_THREADS."""
    script = tmp_path / "env_cli.py"
    script.write_text(
        "import os, sys, time\n"
        "with open(sys.argv[1], 'a') as h:\n"
        "    h.write(f\"{sys.argv[2]} {os.environ.get('OMP_NUM_THREADS')} {time.monotonic()}\\n\")\n"
        "time.sleep(0.2)\n"
    )
    log = tmp_path / "order.txt"
    steps = []
    for name in ("a", "b", "long"):
        folder = tmp_path / name
        marker = folder / "done.txt"
        steps.append(Step(name, None, folder, [[str(log), name], [str(marker), "x"]], marker, {"n": name}))
    steps[-1].exclusive, steps[-1].threads = True, 3
    runner = Runner(steps, tmp_path / "timings.json", jobs=2, root=tmp_path)
    runner.executable = [sys.executable, str(script)]
    runner.run()
    rows = [line.split() for line in log.read_text().splitlines()]
    assert rows[0][:2] == ["long", "3"]  # first, with its own thread count
    assert {row[0] for row in rows[1:]} == {"a", "b"}
    assert all(row[1] != "3" for row in rows[1:])  # the others keep the caller's environment
    assert float(rows[1][2]) >= float(rows[0][2]) + 0.2  # nothing started while it ran
