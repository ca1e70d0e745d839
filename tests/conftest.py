"""Shared fixtures: keep tests on the CPU, offline, and out of the repository tree.

Which tests see a GPU. Only tests marked `gpu` may use a CUDA device; every other test runs on the CPU,
also on a GPU machine. CUDA reads `CUDA_VISIBLE_DEVICES` once, when the driver is first initialised in the
process (`torch.cuda.is_available()` without NVML, any `.cuda()`), and `torch.cuda.device_count()` is cached
from then on, so setting the variable inside a test comes too late if anything counted the devices earlier —
e.g. a `skipif(not torch.cuda.is_available())` evaluated while test modules are collected. Hence:

1. importing this file (before any test module is collected) hides every device for the whole process, so
   collection, every CPU test and every subprocess a test starts see no GPU;
2. a `gpu` test gets the original `CUDA_VISIBLE_DEVICES` back for its run (`pytest_runtest_setup`) and is
   skipped *then*, not at collection, when no device is visible. A process that initialised CUDA while the
   devices were hidden cannot see them again: run GPU tests on their own, `pytest -m gpu`;
3. every other test also sees `torch.cuda.is_available() == False` and `torch.cuda.device_count() == 0`
   in-process (a `gpu` test earlier in the same session may have initialised CUDA with the device visible,
   after which the environment no longer hides it) and `CUDA_VISIBLE_DEVICES=""` in its subprocesses.

`tests/test_conftest_devices.py` checks all three in a pytest subprocess on a simulated GPU machine.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: what the machine offered before this file hid it (None: the variable was not set)
ORIGINAL_VISIBLE_DEVICES = os.environ.get("CUDA_VISIBLE_DEVICES")
#: `DIFFINJECT_TEST_GPU=1 pytest -m gpu` (what `benchmarks/gpu_check.sh` runs): leave the devices visible from
#: the start, so CUDA is never initialised while they are hidden; CPU tests still see none in-process (3.)
SHOW_GPU = os.environ.get("DIFFINJECT_TEST_GPU") == "1"
if not SHOW_GPU:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _set_visible(value: str | None) -> None:
    if value is None:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = value


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Show the machine's devices to a `gpu` test; skip it (before its fixtures run) when there are none."""
    if item.get_closest_marker("gpu") is None:
        return
    _set_visible(ORIGINAL_VISIBLE_DEVICES)
    if not torch.cuda.is_available():
        if not SHOW_GPU:
            _set_visible("")
        pytest.skip(
            "needs a CUDA device (none visible, or CUDA was initialised while hidden: run `pytest -m gpu`)"
        )


def pytest_runtest_teardown(item: pytest.Item) -> None:
    if not SHOW_GPU:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(autouse=True)
def _cpu_and_quiet(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    # Two small cores on CI: one intra-op thread is several times faster than oversubscribing them
    # (measured: 3 CMNIST epochs 0.96 s with 1 thread against 16.6 s with 2 under load).
    torch.set_num_threads(1)
    if request.node.get_closest_marker("gpu") is None:  # only `gpu` tests may see a GPU
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
