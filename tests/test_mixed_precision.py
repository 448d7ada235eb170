"""bf16 autocast: Soft MoE routing in float32, the rest in bf16; a bf16 run tracks the fp32 run; weights stay fp32."""

from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from mmsoftmoe.layers import SoftMoE
from tests.test_training import _fit

# Largest |bf16 loss - fp32 loss| over the 20 steps below, measured on CPU (torch 2.14): 0.0072 on losses of 2-3.
# The tolerance leaves 4x margin; a bf16 run that diverged would be off by tenths.
BF16_LOSS_TOLERANCE = 0.03
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_soft_moe_routes_in_float32_and_runs_experts_in_bf16_under_autocast():
    torch.manual_seed(0)
    layer = SoftMoE(32, 64, num_experts=8)
    x = torch.randn(2, 16, 32)
    expert_inputs = []
    layer.experts.register_forward_hook(lambda mod, args, out: expert_inputs.append((args[0].dtype, out.dtype)))
    reference = layer.routing_weights(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer.router_logits(x)
        dispatch, combine = layer.routing_weights(x)
        y = layer(x)
    assert logits.dtype == dispatch.dtype == combine.dtype == torch.float32
    # Computed with autocast off: the same numbers as without autocast, not merely close.
    assert torch.equal(dispatch, reference[0]) and torch.equal(combine, reference[1])
    assert expert_inputs == [(torch.bfloat16, torch.bfloat16)] and y.dtype == torch.bfloat16
    assert not torch.equal(y.float(), layer(x))  # the contractions really ran in bf16


@pytest.mark.slow
def test_bf16_run_tracks_the_fp32_run_and_checkpoints_stay_fp32(tmp_path: Path):
    fp32 = _fit(tmp_path / "fp32", "steps=20", "checkpoint_every=10")
    AcceleratorState._reset_state(True)  # accelerate keeps one precision per process
    bf16 = _fit(tmp_path / "bf16", "steps=20", "checkpoint_every=10", "precision=bf16")
    deviation = [abs(bf16[s]["loss"] - fp32[s]["loss"]) for s in range(1, 21)]
    assert max(deviation) <= BF16_LOSS_TOLERANCE, deviation
    assert max(deviation) > 1e-4  # it was a bf16 run
    assert bf16[20]["loss"] < bf16[1]["loss"] - 0.5
    weights = [tmp_path / "bf16/final/open_clip_model.safetensors",
               *sorted((tmp_path / "bf16/checkpoints").glob("step_*/model.safetensors"))]
    assert len(weights) == 3
    for path in weights:
        dtypes = {t.dtype for t in load_file(path).values() if t.is_floating_point()}
        assert dtypes == {torch.float32}, path

