"""Learning-rate schedules against their formulas (big_vision's rsqrt with the paper's linear cooldown; cosine)."""

import math

import pytest

from mmsoftmoe_training.optim import lr_multiplier


def rsqrt(step, *, warmup, total, cooldown):
    """Hand formula: linear warmup, then sqrt(warmup / step), times a linear ramp to 0 over the last steps."""
    mult = (step + 1) / warmup if step < warmup else math.sqrt(warmup / step)
    if step >= warmup and step >= total - cooldown:
        mult *= (total - step) / cooldown
    return mult


@pytest.mark.parametrize("step", [0, 4, 9, 10, 40, 79, 80, 90, 99])
def test_rsqrt_with_cooldown(step):
    got = lr_multiplier(step, schedule="rsqrt", total_steps=100, warmup_steps=10, cooldown_steps=20)
    assert got == pytest.approx(rsqrt(step, warmup=10, total=100, cooldown=20))


def test_rsqrt_landmarks():
    kwargs = dict(schedule="rsqrt", total_steps=100, warmup_steps=10, cooldown_steps=20)
    assert lr_multiplier(9, **kwargs) == 1.0  # end of warmup
    assert lr_multiplier(40, **kwargs) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert lr_multiplier(90, **kwargs) == pytest.approx(math.sqrt(10 / 90) * 0.5)  # half-way down the cooldown
    assert lr_multiplier(99, **kwargs) == pytest.approx(math.sqrt(10 / 99) / 20)  # last step: one ramp unit left


def test_cosine_and_constant():
    kwargs = dict(total_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(10, schedule="cosine", **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kwargs) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_multiplier(110, schedule="cosine", **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(3, schedule="constant", **kwargs) == pytest.approx(0.4)
    assert lr_multiplier(100, schedule="constant", **kwargs) == 1.0
