"""bf16 FSDP2 (`precision=bf16` in a sharded run): the documented torchrun command at 2 processes, ep=2, against
the same run in fp32; the planner's all-gather bytes against a traced bf16 step."""

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from benchmarks.dist_bench import launch
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.parallel.cost_model import Layout, collective_bytes, count_model
from mmsoftmoe.parallel.dcp import SHARDED_DIR
from tests.checkpoint_fixtures import losses
from tests.test_mixed_precision import BF16_LOSS_TOLERANCE
from tests.test_parallel_fit import EP2, run, torchrun

MICRO = "SoftMoE-Micro-4-32"


@pytest.mark.slow
def test_bf16_sharded_run_tracks_the_fp32_sharded_run_with_fp32_state(tmp_path):
    runs = {}
    for precision in ("no", "bf16"):
        out = tmp_path / precision
        run(torchrun(2, f"output_dir={out}", "steps=20", "checkpoint_every=10", f"precision={precision}", *EP2))
        runs[precision] = losses(out)
    deviation = [abs(runs["bf16"][s] - runs["no"][s]) for s in range(1, 21)]
    assert max(deviation) <= BF16_LOSS_TOLERANCE, deviation
    assert max(deviation) > 1e-4  # it was a bf16 run
    # Master weights, optimizer state and checkpoints stay fp32: the sharded checkpoint and the final model.
    steps = sorted((tmp_path / "bf16" / "checkpoints").glob("step_*"))
    metadata = FileSystemReader(str(steps[-1] / SHARDED_DIR)).read_metadata()
    dtypes = {m.properties.dtype for m in metadata.state_dict_metadata.values() if hasattr(m, "properties")}
    assert dtypes == {torch.float32}, dtypes
    final = load_file(str(tmp_path / "bf16" / "final" / "open_clip_model.safetensors"))
    assert {t.dtype for t in final.values() if t.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_bf16_all_gathers_half_the_bytes_the_planner_counts():
    """One traced step each of fp32 and bf16 FSDP2 at 2 processes: the planner's bytes equal the traced ones."""
    counts = count_model(build_clip(MICRO, device="meta")[0])
    traced = {}
    for layout, dtype_bytes in (("fsdp2", 4), ("fsdp2-bf16", 2)):
        row = launch(MICRO, 2, layout, 16, 1)
        traced[layout] = {k: round(v * 2**20) for k, v in row["collective_mib_per_step"].items()}
        planned = collective_bytes(counts, Layout("fsdp2", 1, 2, 1), 8, act_bytes=dtype_bytes,
                                   param_bytes=dtype_bytes)
        assert planned == traced[layout], layout
    ratio = traced["fsdp2-bf16"]["all_gather"] / traced["fsdp2"]["all_gather"]
    assert 0.5 <= ratio < 0.51  # the routing parameters stay fp32
    assert traced["fsdp2-bf16"]["reduce_scatter"] == traced["fsdp2"]["reduce_scatter"]  # gradients reduced in fp32
