"""Shared helpers for the checkpoint tests: smoke-config runs of the real trainer, a run killed after a given step,
and the per-step losses a run logged."""

from __future__ import annotations

from pathlib import Path

import pytest
from accelerate.state import AcceleratorState

import mmsoftmoe_training.main as train_main
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.logger import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


class SimulatedKill(BaseException):
    """Stands in for SIGKILL: a BaseException, so no `except Exception` cleanup runs (as none would after a kill)."""


def smoke_config(out: Path, *overrides: str):
    """The smoke config shrunk to seconds: no evaluation, no data workers, a loss logged every step."""
    return load_config(SMOKE, [f"output_dir={out}", "eval.dataset=none", "data.num_workers=0", "batch_size=16",
                               "log_every=1", *overrides])


def run(out: Path, *overrides: str) -> dict[int, float]:
    """Train with the smoke config into `out`; the loss logged at each step."""
    AcceleratorState._reset_state(True)
    train_main.fit(smoke_config(out, *overrides))
    return losses(out)


def run_killed_after(out: Path, step: int, *overrides: str) -> None:
    """Train like `run` but die (`SimulatedKill`) as optimizer step `step + 1` starts."""
    calls = {"n": 0}
    real_step = train_main.optimizer_step

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > step:
            raise SimulatedKill(f"killed before step {calls['n']}")
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_main, "optimizer_step", dying_step)
        try:
            run(out, *overrides)
        except SimulatedKill:
            return
    raise AssertionError(f"the run finished before step {step + 1}")


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
