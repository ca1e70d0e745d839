"""The pipeline's terminal (issue 20 §2), with a stand-in stage that prints what a real one does: the
terminal gets the pipeline's lines, our warnings, each library warning once and a heartbeat with the
stage's progress line; the stage's `pipeline.log` gets everything; `--verbose` puts the stage output on
the terminal."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from diffinject.workflow import stage_output
from diffinject.workflow.runner import Runner, Step
from diffinject.workflow.stage_output import Terminal, own_source

#: what a classifier stage prints, noise included; `stage.py OUT` then writes OUT (the artifact)
STAGE = """
import sys, time
from pathlib import Path
print("Seed set to 0", file=sys.stderr)
print("┃   ┃ Name ┃ Type ┃ Params ┃ Mode ┃ FLOPs ┃")
print("/v/lib/python3.11/site-packages/lightning/pytorch/trainer/call.py:283: Be aware that when using "
      "`ckpt_path`, callbacks used to create the checkpoint need to be provided", file=sys.stderr)
print("/repo/src/diffinject/stages/classifiers.py:271: UserWarning: VanillaClassifier: only 12.1 effective "
      "pseudo-conflicting validation images", file=sys.stderr)
print("  rank_zero_warn(", file=sys.stderr)
print("WARNING diffinject.data: bffhq: 3 unreadable images skipped", file=sys.stderr)
print("Epoch 3/9 ━━━━━━━━━━ 15/15 0:00:00 • 0:00:00 85.52it/s", end="\\r", flush=True)
print("[progress] fit: epoch 3/9, step 40/120 (33%), 2.1 steps/s, ETA <1 min", flush=True)
sys.stderr.flush()
time.sleep(float(sys.argv[2]))
Path(sys.argv[1]).write_text("done")
"""


@pytest.fixture
def stage(tmp_path: Path) -> list[str]:
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    return [sys.executable, str(script)]


def two_steps(root: Path, pause: float = 0.0) -> list[Step]:
    steps = []
    for name in ("vanilla", "lff"):
        folder = root / "seed0" / name
        artifact = folder / "metrics.json"
        steps.append(Step(name, 0, folder, [[str(artifact), str(pause)]], artifact, {"stage": name}))
    return steps


def test_the_terminal_gets_pipeline_lines_and_warnings_the_log_gets_everything(
    tmp_path: Path, stage: list[str], capfd: pytest.CaptureFixture[str]
) -> None:
    runner = Runner(two_steps(tmp_path), tmp_path / "timings.json", root=tmp_path)
    runner.executable = stage
    runner.run()
    out, err = capfd.readouterr()
    terminal = (out + err).splitlines()
    assert all(line.startswith(("[pipeline ", "  $ ")) for line in terminal), terminal
    assert "Seed set to 0" not in out + err and "FLOPs" not in out + err
    ours = [line for line in terminal if "warning: VanillaClassifier: only 12.1" in line]
    assert len(ours) == 2 and ours[0].endswith("(stages/classifiers.py:271)")  # each stage, each time
    library = [line for line in terminal if "library warning (lightning/pytorch/trainer/call.py:283" in line]
    assert len(library) == 1  # once for the whole run; both logs have it
    assert sum("warning: bffhq: 3 unreadable images skipped" in line for line in terminal) == 2
    assert f"seed0/vanilla: running (output: {tmp_path / 'seed0' / 'vanilla' / 'pipeline.log'})" in out
    for name in ("vanilla", "lff"):
        log = (tmp_path / "seed0" / name / "pipeline.log").read_text()
        for printed in ("Seed set to 0", "FLOPs", "call.py:283: Be aware", "rank_zero_warn(", "85.52it/s"):
            assert printed in log
        assert "[progress] fit: epoch 3/9, step 40/120" in log


def test_the_heartbeat_shows_the_stage_progress_line(
    tmp_path: Path, stage: list[str], capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stage_output, "HEARTBEAT_S", 0.6)
    monkeypatch.setattr(stage_output, "POLL_S", 0.05)
    runner = Runner(two_steps(tmp_path, pause=1.5)[:1], tmp_path / "timings.json", root=tmp_path)
    runner.executable = stage
    runner.run()
    out = capfd.readouterr().out
    beats = [line for line in out.splitlines() if "running for" in line]
    assert beats and beats[0].endswith("| fit: epoch 3/9, step 40/120 (33%), 2.1 steps/s, ETA <1 min"), out


@pytest.mark.parametrize("jobs", [1, 2])
def test_verbose_puts_the_stage_output_on_the_terminal(
    tmp_path: Path, stage: list[str], capfd: pytest.CaptureFixture[str], jobs: int
) -> None:
    runner = Runner(two_steps(tmp_path), tmp_path / "timings.json", jobs=jobs, root=tmp_path, verbose=True)
    runner.executable = stage
    runner.run()
    out, err = capfd.readouterr()
    assert (out + err).count("Seed set to 0") == 2 and "rank_zero_warn(" in out + err
    if jobs > 1:  # line by line, after the stage's name
        assert "seed0/lff: Seed set to 0" in out
    assert "Seed set to 0" in (tmp_path / "seed0" / "lff" / "pipeline.log").read_text()


def test_own_source_is_the_last_diffinject_folder_outside_site_packages() -> None:
    assert own_source("/work/main/src/diffinject/stages/lff.py") == "stages/lff.py"
    assert own_source("/venv/lib/python3.11/site-packages/diffinject/cli.py") == "cli.py"
    assert own_source("/home/u/diffinject/.venv/lib/python3.11/site-packages/torch/nn/x.py") is None
    assert own_source("/home/u/diffinject/src/diffinject/nets/unet.py") == "nets/unet.py"
    assert Terminal().pick("/x/lib/python3.11/site-packages/torch/a.py:3: UserWarning: w") is not None
    assert Terminal().pick("Seed set to 0") is None
