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
    opt = study.build_optimizer_with_router_mult(model, lr=1e-3, weight_decay=0.03, router_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    boosted = {names[id(p)] for g in opt.param_groups if g["lr_mult"] == 10.0 for p in g["params"]}
    assert boosted == {f"blocks.{i}.mlp.{p}" for i in (2, 3) for p in ("phi", "scale")}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


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
