"""Test-wide settings: offline hubs, deterministic CPU math, few threads (CI has 2 cores)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# `make test` runs one pytest-xdist worker per core: each computes on one thread (two 2-thread workers on 2 cores
# oversubscribe), and so do the processes it starts.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402

if XDIST_WORKER:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one state (one precision) per process: a test that makes an Accelerator neither inherits
    another test's nor leaves its own."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
