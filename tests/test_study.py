"""The small-scale study runner: its report against the runs' own files, FLOPs and statistics by hand."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from benchmarks import study

# The micro tower: m 64 tokens of width d 64 from 4x4x3 = 48-value patches, depth 4, MLP width 256, CLIP dim 64.
M, D, PATCH_IN, DEPTH, H, EMBED = 64, 64, 48, 4, 256, 64


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("study")
    study.main(["--variants", "dense,softmoe", "--seeds", "0", "--steps", "3", "--batch-size", "8",
                "--out", str(out)])
    return json.loads((out / "study.json").read_text()), out


def test_outputs_written(report):
    saved, out = report
    assert list(saved["variants"]) == ["dense", "softmoe"]
    assert (out / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "study.md").read_text()
    for result in saved["variants"].values():
        assert f"| {result['label']} | `{result['timm_model']}` |" in table
    assert "softmoe > dense" in table and "one seed" in table


def test_report_agrees_with_each_runs_files(report):
    saved, _ = report
    for result in saved["variants"].values():
        (run,) = result["runs"]
        run_dir = Path(run["output_dir"])
        records = _records(run_dir)
        final = json.loads((run_dir / "final" / "trainer_state.json").read_text())
        model_cfg = json.loads((run_dir / "final" / "open_clip_config.json").read_text())["model_cfg"]
        assert final["step"] == 3 and final["config"]["batch_size"] == 8 and final["config"]["seed"] == 0
        assert final["config"]["model"]["name"] == result["clip_model"]
        assert model_cfg["vision_cfg"]["timm_model_name"] == result["timm_model"]
        for key, logged in (("zeroshot_acc1", "zeroshot/acc1"), ("fewshot_10shot_acc1", "fewshot/10shot/acc1")):
            assert run[key] == pytest.approx(records[-1][logged]) == pytest.approx(final["metrics"][logged])
            assert result[key] == {"mean": pytest.approx(run[key]), "std": 0.0, "min": run[key], "max": run[key],
                                   "n": 1}
        # log_every is 1 at 3 steps: three throughput records, the first (warm-up) dropped.
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
        assert len(rates) == 3
        assert run["s_per_step"] == pytest.approx(statistics.fmean(8 / r for r in rates[1:]))
        assert run["train_s"] == pytest.approx(3 * run["s_per_step"])


def test_flops_and_parameters_by_hand(report):
    saved, _ = report
    dense, soft = saved["variants"]["dense"], saved["variants"]["softmoe"]
    # qkv, q k^T, attn v, proj, fc1 + fc2 per block; the patch embedding; the CLIP projection of the pooled token.
    block = 2 * M * D * 3 * D + 2 * 2 * M * M * D + 2 * M * D * D + 2 * 2 * M * D * H
    assert dense["flops_per_image"] == 2 * M * PATCH_IN * D + DEPTH * block + 2 * D * EMBED
    # Soft MoE with s = m slots: the experts cost the dense MLP; the router adds logits, dispatch and combine
    # (each 2 m d s FLOPs) in the last 2 blocks.
    assert soft["flops_per_image"] - dense["flops_per_image"] == 2 * 3 * 2 * M * D * M
    assert soft["train_flops_tower"] == 3 * soft["flops_per_image"] * 3 * 8
    # 16 experts of (d h + h + h d + d) replace one MLP of the same size, plus phi (d, 16, 4) and a scale, x 2 blocks.
    expert = 2 * D * H + H + D
    assert soft["params_tower"] - dense["params_tower"] == 2 * (15 * expert + D * 16 * 4 + 1)
    assert soft["params_total"] - soft["params_tower"] == dense["params_total"] - dense["params_tower"]


def test_matched_slots_and_tower_names():
    assert study.timm_name("softmoe", "micro_patch4_32") == "softmoe_vit_micro_patch4_32_e16_s4"  # 16 x 4 = 64
    assert study.timm_name("identity", "mini_patch8_64") == "softmoe_vit_mini_patch8_64_e32_s2_didentity_cidentity"


def test_seconds_per_step_drops_the_warmup_interval():
    records = [{"step": 2, "samples_per_s": 1.0}, {"step": 4, "samples_per_s": 4.0}, {"step": 5, "samples_per_s": 2.0},
               {"step": 5, "zeroshot/acc1": 0.5}]
    # batch 4: intervals of 2 steps in 2 s and 1 step in 2 s after the dropped first one.
    assert study.seconds_per_step(records, batch_size=4) == pytest.approx(4 / 3)
    assert study.seconds_per_step(records[:1], batch_size=4) == pytest.approx(4.0)


def test_claim_verdicts_at_two_standard_errors():
    stats = study.spread
    high, low = stats([0.6, 0.7, 0.8]), stats([0.1, 0.2, 0.3])
    se = math.sqrt(2 * 0.1**2 / 3)  # sample std 0.1 each, 3 seeds each
    assert study.check_claim({"x": high}, {"x": low}, "x") == {"diff": pytest.approx(0.5), "se": pytest.approx(se),
                                                               "verdict": "agrees"}
    assert study.check_claim({"x": low}, {"x": high}, "x")["verdict"] == "contradicts"
    close = stats([0.25, 0.3, 0.35])
    assert study.check_claim({"x": close}, {"x": low}, "x")["verdict"] == "within 2 SE: inconclusive"
    assert study.check_claim({"x": stats([0.9])}, {"x": low}, "x")["se"] is None
