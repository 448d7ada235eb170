"""The small-scale study: matched FLOPs by the accounting module, paired statistics by hand, a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from benchmarks import study

# The micro tower: m 64 tokens, width d 64, MoE in the last 2 of 4 blocks, 64 expert rows per image.
M, D, MOE_LAYERS = 64, 64, 2


@pytest.fixture(scope="module")
def costs() -> dict[str, dict]:
    return {v: study.cost(v, num_classes=16) for v in study.VARIANTS}


def test_matched_variants_spend_the_dense_expert_flops(costs):
    dense = costs["dense"]["flops_per_image"]
    for v in ("softmoe_p1", "softmoe_e16_s4", "uniform", "identity"):
        # Soft MoE's expert MLPs cost exactly the dense MLPs (n p = m rows); the router adds logits, dispatch and
        # combine, each 2 m d (n p) FLOPs per MoE layer.
        assert costs[v]["flops_per_image"] - dense == MOE_LAYERS * 3 * 2 * M * D * M
    for v in ("experts_choice", "tokens_choice_k1"):
        # n C = m buffer rows; the gates add 2 m d n per MoE layer.
        assert costs[v]["flops_per_image"] - dense == MOE_LAYERS * 2 * M * D * 64
    sparse = costs["tokens_choice_k1"]["flops_per_image"]
    assert costs["experts_choice"]["flops_per_image"] == pytest.approx(sparse, rel=0.02)
    assert costs["tokens_choice_k2"]["flops_per_image"] - sparse == MOE_LAYERS * 2 * 2 * M * D * 4 * D
    assert costs["softmoe_p1"]["flops_per_image"] == pytest.approx(dense, rel=0.11)


def test_more_parameters_at_equal_cost(costs):
    dense = costs["dense"]["total"]
    expert_mlp = 2 * D * 4 * D + 4 * D + D  # fc1 + fc2 weights and biases
    # 64 experts replace one MLP in each MoE layer; Soft MoE adds phi (d, 64, 1) and a scale, the sparse gates (d, 64).
    assert costs["softmoe_p1"]["total"] - dense == MOE_LAYERS * (63 * expert_mlp + D * 64 + 1)
    assert costs["experts_choice"]["total"] - dense == MOE_LAYERS * (63 * expert_mlp + D * 64)
    assert costs["dense_wide"]["total"] - dense == 4 * (2 * D * 12 * D + 12 * D)  # hidden 256 -> 1024, 4 blocks


def test_paired_difference_by_hand():
    a, b = [0.50, 0.55, 0.62], [0.40, 0.47, 0.50]
    diffs = [0.10, 0.08, 0.12]
    se = statistics.stdev(diffs) / math.sqrt(3)
    got = study.paired(a, b)
    assert got["diff"] == pytest.approx(0.10) and got["se"] == pytest.approx(se) and got["verdict"] == "holds"
    assert study.paired(b, a)["verdict"] == "reversed"
    # Unpaired the spread between seeds (0.06) would hide this; paired the difference is large against its SE.
    assert study.paired([0.5, 0.6, 0.4], [0.49, 0.62, 0.38])["verdict"] == "within 2 SE: not shown"
    assert study.paired([0.5], [0.4])["se"] is None


def test_router_lr_multiplier_touches_only_router_parameters():
    model = study.build_tower("softmoe_p1", num_classes=8)
    mults = study.lr_multipliers(model, "softmoe_p1", router_lr_mult=10.0)
    opt = study.build_optimizer_with_lr_mults(model, lr=1e-3, weight_decay=0.03, lr_mults=mults)
    names = {id(p): n for n, p in model.named_parameters()}
    boosted = {names[id(p)] for g in opt.param_groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert boosted == {f"blocks.{i}.mlp.{p}" for i in (2, 3) for p in ("phi", "scale")}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert study.lr_multipliers(model, "softmoe_p1") == {}
    with pytest.raises(ValueError, match="does not have"):
        study.build_optimizer_with_lr_mults(model, 1e-3, 0.03, {"blocks.9.mlp.phi": 2.0})


def test_wide_calibration_mlp_is_mup_scaled():
    torch.manual_seed(0)
    dense, wide = study.build_tower("dense", 8), study.build_tower("dense_wide", 8)
    # 4x the hidden width: fc2 starts at 1/sqrt(4) of timm's std 0.02 and learns at lr / 4; fc1 is timm's.
    for block_d, block_w in zip(dense.blocks, wide.blocks, strict=True):
        assert block_w.mlp.fc1.weight.std().item() == pytest.approx(block_d.mlp.fc1.weight.std().item(), rel=0.05)
        assert block_w.mlp.fc2.weight.std().item() == pytest.approx(block_d.mlp.fc2.weight.std().item() / 2,
                                                                     rel=0.05)
    assert study.lr_multipliers(wide, "dense_wide") == {f"blocks.{i}.mlp.fc2.weight": 0.25 for i in range(4)}
    opt = study.build_optimizer_with_lr_mults(wide, 1e-3, 0.03, study.lr_multipliers(wide, "dense_wide"))
    quarter = [p for g in opt.param_groups if g["lr_mult"] == 0.25 for p in g["params"]]
    assert {id(p) for p in quarter} == {id(b.mlp.fc2.weight) for b in wide.blocks}


def test_inits_draw_experts_like_the_mlps_they_replace_or_as_vmoe():
    torch.manual_seed(0)
    timm_tower = study.build_tower("softmoe_p1", 8, init="timm")
    experts = timm_tower.blocks[3].mlp.experts
    dense_fc1 = timm_tower.blocks[0].mlp.fc1.weight
    assert experts.w1.std().item() == pytest.approx(dense_fc1.std().item(), rel=0.05)  # timm: std 0.02 alike
    assert not torch.equal(experts.w1[0], experts.w1[1])  # drawn per expert
    vmoe_tower = study.build_tower("softmoe_p1", 8, init="vmoe")
    experts, fc1 = vmoe_tower.blocks[3].mlp.experts, vmoe_tower.blocks[0].mlp.fc1
    assert torch.equal(experts.w1[0], experts.w1[63])  # one shared draw
    bound = math.sqrt(6 / (D + 4 * D))  # xavier-uniform, the same for the dense MLPs (timm's jax init)
    assert experts.w1.abs().max() <= bound and experts.w1.abs().max() > 0.95 * bound
    assert fc1.weight.abs().max() <= bound and fc1.weight.abs().max() > 0.95 * bound
    assert torch.count_nonzero(vmoe_tower.head.weight) == 0
    # The init variant keeps vmoe's shared draw inside the timm tower.
    mixed = study.build_tower("softmoe_p1_vmoe_experts", 8, init="timm").blocks[3].mlp.experts
    assert torch.equal(mixed.w1[0], mixed.w1[1])
    with pytest.raises(ValueError, match="init must be one of"):
        study.build_tower("dense", 8, init="xavier")


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    torch.set_num_threads(1)
    report = study.main(["--variants", "dense,softmoe_p1,tokens_choice_k1", "--seeds", "0,1", "--steps", "3",
                         "--batch-size", "8", "--held-out", "40", "--num-glyphs", "16", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["summary"]["variants"].keys() == report["summary"]["variants"].keys()
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    soft = saved["summary"]["variants"]["softmoe_p1"]
    assert 0.0 < soft["routing"]["combine_entropy_rel"] <= 1.0 and soft["routing"]["scale"] > 0
    assert 0.0 <= saved["summary"]["variants"]["tokens_choice_k1"]["routing"]["dropped_fraction"] <= 1.0
    recalls = [r["recall"] for r in soft["runs"]]
    dense = [r["recall"] for r in saved["summary"]["variants"]["dense"]["runs"]]
    assert soft["vs_dense"]["diff"] == pytest.approx(statistics.fmean(recalls) - statistics.fmean(dense))
    assert "softmoe_p1 > dense" in (tmp_path / "study.md").read_text()


@pytest.mark.slow
def test_worker_processes_give_the_in_process_results(tmp_path):
    """`--jobs 2` (the CPU command of the full study) trains each (variant, seed) in its own 1-thread process; the
    runs are deterministic in (variant, seed), so they must equal this process's."""
    torch.set_num_threads(1)
    args = ["--variants", "dense,softmoe_p1", "--seeds", "3", "--steps", "2", "--batch-size", "8", "--held-out", "30",
            "--num-glyphs", "32", "--num-classes", "8"]
    here = study.main([*args, "--out", str(tmp_path / "here")])["summary"]["variants"]
    pooled = study.main([*args, "--jobs", "2", "--out", str(tmp_path / "pool")])["summary"]["variants"]
    for v in ("dense", "softmoe_p1"):
        a, b = here[v]["runs"][0], pooled[v]["runs"][0]
        assert a["recall"] == b["recall"] and a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-5)
