"""The scale-out planner: exact parameter and byte counts against independent references (the model's own
parameters, a hand computation, the bytes dist_bench traces in a real 2-process step), layouts it rejects, the
CLI, and where its fitting decision flips."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mmsoftmoe_cli
from benchmarks.dist_bench import launch
from mmsoftmoe.models.accounting import count_parameters
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.parallel import expert_layers
from mmsoftmoe.parallel.cost_model import GIB, Layout, _padded, collective_bytes, count_model, layouts, plan_layout

MICRO = "SoftMoE-Micro-4-32"


@pytest.fixture(scope="module")
def micro():
    model = build_clip(MICRO, device="meta")[0]
    return model, count_model(model)


def test_parameter_split_matches_the_model(micro):
    model, counts = micro
    assert counts.total_params == count_parameters(model)
    assert counts.expert_params == sum(count_parameters(m.experts) for m in expert_layers(model).values())
    blocks = len(model.visual.trunk.blocks) + len(model.transformer.resblocks)
    assert len(counts.dense_units) == blocks + 1  # every block, then the root's remainder
    # logit_scale plus one Soft MoE `scale` per MoE layer, kept whole.
    assert counts.scalar_params == 1 + len(expert_layers(model))


def test_fsdp2_padding_hand_computed():
    # dim 0 padded to a multiple of the shards: 5 -> 8 rows of 3; experts 16 / ep 4 = 4 rows -> 6 at efsdp 3.
    assert _padded([(5, 3)], 4) == 24
    assert _padded([(16, 2, 2)], 3, dim0_div=4) == 6 * 4


def test_bytes_hand_computed(micro):
    model, counts = micro
    p = count_parameters(model)
    ddp = collective_bytes(counts, Layout("ddp", 2, 1, 1), local_batch=8)
    assert ddp["all_reduce"] == 4 * p
    assert ddp["all_gather"] == 2 * 8 * 64 * 4  # image and text features, embed_dim 64, fp32
    ep = collective_bytes(counts, Layout("fsdp2+ep", 1, 2, 2), local_batch=8)
    slots = [m.num_slots for m in expert_layers(model).values()]
    assert ep["all_to_all"] == sum(4 * 8 * s * 64 * 4 for s in slots)  # 2 in forward, 2 in backward
    # Experts sit on one expert-FSDP rank (no collective); FSDP2 pads dim 0 of each dense parameter to even.
    experts = {id(q) for m in expert_layers(model).values() for q in m.experts.parameters()}
    dense = sum(math.ceil(q.shape[0] / 2) * 2 * q[0].numel() for q in model.parameters()
                if q.ndim and id(q) not in experts)
    assert ep["reduce_scatter"] == 4 * dense and dense >= p - counts.expert_params - counts.scalar_params


@pytest.mark.slow
def test_bytes_equal_traced_two_process_step(micro):
    _, counts = micro
    row = launch(MICRO, 2, "fsdp2+ep", 16, 1)
    traced = {k: round(v * 2**20) for k, v in row["collective_mib_per_step"].items()}
    assert collective_bytes(counts, Layout("fsdp2+ep", 1, 2, 2), local_batch=8) == traced


def test_bad_layout_rejected(micro):
    _, counts = micro
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide parallel.dp_shard=4"):
        plan_layout(counts, Layout("fsdp2+ep", 1, 4, 3), global_batch=16, gpu_memory_gib=80)
    with pytest.raises(ValueError, match="batch_size=10"):
        plan_layout(counts, Layout("ddp", 4, 1, 1), global_batch=10, gpu_memory_gib=80)


def test_fitting_flips_at_the_memory_it_needs(micro):
    _, counts = micro
    layout = Layout("fsdp2", 1, 4, 1)
    need = plan_layout(counts, layout, global_batch=16, gpu_memory_gib=1e9).memory["total"] / GIB
    assert plan_layout(counts, layout, global_batch=16, gpu_memory_gib=need * 1.001).fits
    assert not plan_layout(counts, layout, global_batch=16, gpu_memory_gib=need * 0.999).fits


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = mmsoftmoe_cli.main(["plan", "--config", "softmoe_b16_sigmoid_256", *args, f"model.name={MICRO}",
                               "batch_size=16", "precision=no", "model.grad_checkpointing=false"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_and_table(capsys):
    code, out, _ = run_cli(capsys, "--gpus", "4", "--gpu-memory", "80", "--json")
    result = json.loads(out)
    assert code == 0 and result["gpus"] == 4
    names = {(r["layout"]["name"], r["layout"]["ep"]) for r in result["layouts"]}
    assert names == {("ddp", 1), ("fsdp2", 1), ("fsdp2+ep", 2), ("fsdp2+ep", 4)}
    assert result["best"] == result["layouts"][0]["overrides"]
    assert all(math.isclose(r["step_s"], r["compute_s"] + r["comm_s"]) for r in result["layouts"])
    code, out, _ = run_cli(capsys, "--gpus", "4", "--gpu-memory", "0.01")
    assert code == 0 and "no layout fits" in out


def test_cli_user_error_is_one_line(capsys):
    code, _, err = run_cli(capsys, "--gpus", "3", "--gpu-memory", "80", "parallel.dp_shard=-1",
                             "parallel.dp_replicate=2")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: --gpus 3")


def test_grad_checkpointing_counts_the_largest_block_once_more(micro):
    """The recomputed block's activations equal the bytes the largest block saves when run alone."""
    model, _ = micro
    with_ckpt = count_model(build_clip(MICRO, device="meta")[0], grad_checkpointing=True)
    batch, saved = 2, {}
    blocks = [(model.visual.trunk.blocks, (batch, 64, 64)), (model.transformer.resblocks, (batch, 32, 64))]
    for stack, shape in blocks:
        for i, block in enumerate(stack):
            params = {id(p) for p in block.parameters()}
            seen: dict[int, int] = {}

            def pack(t, seen=seen, params=params):
                if id(t) not in params:
                    seen[id(t)] = t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                block.train()(torch.zeros(shape, device="meta", requires_grad=True))
            saved[(id(stack), i)] = sum(seen.values()) / batch
    assert with_ckpt.recompute_bytes_per_example == max(saved.values()) > 0
    assert count_model(model).recompute_bytes_per_example == 0


def test_hsdp_is_searched_and_startup_host_memory_is_one_draw(micro):
    model, counts = micro
    found = {(lay.dp_replicate, lay.dp_shard, lay.ep) for lay in layouts(4, counts.num_experts)}
    assert found == {(4, 1, 1), (1, 4, 1), (1, 4, 2), (1, 4, 4), (2, 2, 1), (2, 2, 2)}  # DDP first, then HSDP
    largest = model.token_embedding.weight.numel()  # 49408 x 64: larger than any expert's slice
    sharded = plan_layout(counts, Layout("fsdp2", 2, 2, 1), global_batch=16, gpu_memory_gib=80)
    ddp = plan_layout(counts, Layout("ddp", 4, 1, 1), global_batch=16, gpu_memory_gib=80)
    assert sharded.extra["startup_host_bytes"] == 4 * largest
    assert ddp.extra["startup_host_bytes"] == 4 * (count_parameters(model) + largest)


@pytest.mark.slow
def test_hsdp_bytes_equal_traced_four_process_step(micro):
    """2 replicas x 2 shards, ep=2: the replica all-reduce of the reduced shards included."""
    _, counts = micro
    row = launch(MICRO, 4, "hsdp", 16, 1)
    traced = {k: round(v * 2**20) for k, v in row["collective_mib_per_step"].items()}
    assert collective_bytes(counts, Layout("fsdp2+ep", 2, 2, 2), local_batch=4) == traced
