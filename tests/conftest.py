"""Shared fixtures: keep tests on the CPU, offline, and out of the repository tree."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _cpu_and_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two cores on CI: one intra-op thread per test process avoids oversubscription with workers.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
