"""conftest.py's GPU rule on a simulated GPU machine: only `gpu` tests see the device, from collection on.

A pytest subprocess runs this suite's conftest beside a few probe tests, with a plugin that replaces
`torch.cuda.is_available` / `device_count` by NVML-like checks of `CUDA_VISIBLE_DEVICES` (one fake device
unless it is hidden, fixed once `torch.cuda.init()` ran, as torch caches it), so no GPU is needed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

FAKE_GPU_PLUGIN = """
import os
import torch

_cached = []  # like torch: the count is read from the environment until CUDA is initialised, then fixed


def _count():
    if _cached:
        return _cached[0]
    if os.environ.get("FAKE_GPU") != "1":
        return 0
    return 0 if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else 1


torch.cuda.is_available = lambda: _count() > 0
torch.cuda.device_count = _count
torch.cuda.init = lambda: _cached.append(_count())
"""

PROBES = """
import os
import subprocess
import sys

import pytest
import torch

AT_COLLECTION = (torch.cuda.is_available(), os.environ.get("CUDA_VISIBLE_DEVICES"))
if os.environ.get("DIFFINJECT_TEST_GPU") == "1":
    torch.cuda.init()  # a library that initialises CUDA while modules are collected


def test_collection_saw_no_gpu():
    assert AT_COLLECTION == (False, "")


def _child_sees():
    code = "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()


def test_cpu_before():
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert _child_sees() == "''"


@pytest.mark.gpu
def test_gpu():
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == os.environ["EXPECTED_VISIBLE"]
    torch.cuda.init()  # as a real `.cuda()` would: the device count is fixed from now on


def test_cpu_after():
    assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == "" and _child_sees() == "''"
"""


def _run(
    tmp_path: Path, fake_gpu: bool, visible: str, extra: tuple[str, ...] = (), show_gpu: bool = False
) -> tuple[str, subprocess.CompletedProcess]:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (suite / "test_probes.py").write_text(PROBES)
    (suite / "fake_gpu.py").write_text(FAKE_GPU_PLUGIN)
    env = {**os.environ, "FAKE_GPU": "1" if fake_gpu else "0", "EXPECTED_VISIBLE": visible}
    env["DIFFINJECT_TEST_GPU"] = "1" if show_gpu else "0"
    env["CUDA_VISIBLE_DEVICES"] = visible  # the machine's setting, e.g. the second of two GPUs
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(suite), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "pytest", "-p", "fake_gpu", "-p", "no:cacheprovider", "-q", "-rs"]
    command += ["-m", "", "-W", "ignore::pytest.PytestUnknownMarkWarning", "--rootdir", str(suite)]
    command += [*extra, str(suite)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=suite, env=env)
    return done.stdout + done.stderr, done


def test_only_gpu_tests_see_the_device(tmp_path: Path) -> None:
    output, done = _run(tmp_path, fake_gpu=True, visible="1")
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"\b4 passed\b", output), output[-3000:]


def test_gpu_test_is_skipped_at_run_time_without_a_device(tmp_path: Path) -> None:
    output, done = _run(tmp_path, fake_gpu=False, visible="0")
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"\b3 passed, 1 skipped\b", output), output[-3000:]
    assert "needs a CUDA device" in output


def test_gpu_run_keeps_the_device_visible_from_the_start(tmp_path: Path) -> None:
    """`DIFFINJECT_TEST_GPU=1 pytest -m gpu` (the GPU kit): CUDA may be initialised early and still see it."""
    output, done = _run(tmp_path, fake_gpu=True, visible="1", extra=("-m", "gpu"), show_gpu=True)
    assert done.returncode == 0, output[-3000:]
    assert re.search(r"\b1 passed, 3 deselected\b", output), output[-3000:]
