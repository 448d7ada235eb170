"""The device suite at its CPU-smoke size: every part runs, its FLOP counts equal independent counts, and every
derived figure (samples/s, MFU, ratios, the sweep's loss, the targets) follows from the measured seconds."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import gpu_suite
from benchmarks.layer_bench import SETTINGS, layer_specs
from mmsoftmoe.models.clip import build_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The command as users run it, in a fresh process: its parts are forked from it, and forking this test
    process (whose torch thread pools earlier tests started) can deadlock the child."""
    out = tmp_path_factory.mktemp("gpu_suite")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--cpu-smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "gpu_suite.json").read_text()), out


def all_timings(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    if "seconds" in node:
        return [node]
    return [t for v in node.values() for t in all_timings(v)]


def per_image(row: dict, what: str) -> float:
    return row[what]["seconds"] / row[what]["batch"]


@pytest.mark.slow
def test_every_part_measures_every_row(smoke):
    report, out = smoke
    parts = report["parts"]
    assert list(parts) == list(gpu_suite.PARTS_ORDER)
    for data in parts.values():
        assert not data["errors"] and not {"killed", "failed", "not_run"} & data.keys()
        # Only the compiled rows the smoke size leaves out are skipped.
        assert all(k.endswith("/compiled") and why.startswith("cpu-smoke: compiled only")
                   for k, why in data["skipped"].items())
    assert set(parts["towers"]["rows"]["micro_patch4_32"]) == {"dense", "soft_moe", "tokens_choice_k1",
                                                               "experts_choice"}
    assert set(parts["clip"]["rows"]["dense"]) == {"mmsoftmoe", "open_clip"}
    assert set(parts["sweep"]["rows"]) == {"e4", "e8", "e16"}
    assert set(parts["layer"]["rows"]["tiny"]) == {"soft_moe", "dense", "lucidrains"}
    assert set(parts["layer"]["rows"]["tiny"]["soft_moe"]) == {"eager", "compiled"}  # compiled: one tiny layer
    meta = report["meta"]
    assert meta["device_name"] and meta["torch"] == torch.__version__ and meta["date"].startswith("20")
    assert json.loads((out / "gpu_suite.json").read_text()) == json.loads(json.dumps(report))
    assert all((out / "parts" / f"{name}.json").is_file() for name in gpu_suite.PARTS_ORDER)


@pytest.mark.slow
def test_mfu_is_achieved_flop_rate_over_the_peak_of_the_same_run(smoke):
    report, _ = smoke
    peak = report["parts"]["peak"]["rows"]["gemm"]["bf16"]["tflops"]
    assert report["peak_tflops"] == peak > 0
    timings = [t for name, data in report["parts"].items() if name != "peak" for t in all_timings(data["rows"])]
    assert len(timings) == 8 + 3 + 6 + 4  # towers train+infer, CLIP steps, sweep train+fwd_bwd, layers
    for t in timings:
        assert t["seconds"] > 0 and t["flops"] > 0
        assert t["samples_per_s"] == pytest.approx(t["batch"] / t["seconds"])
        assert t["tflops_per_s"] == pytest.approx(t["flops"] / t["seconds"] / 1e12)
        assert t["mfu"] == pytest.approx(t["flops"] / t["seconds"] / 1e12 / peak)


def vit_flops(m: int, d: int, depth: int, patch: int, h: int, moe_blocks: int = 0, experts: int = 0) -> int:
    """Hand count of a tower's forward FLOPs per image: patch embedding, attention, MLP or Soft MoE (p = 1)."""
    attention = 2 * m * d * 4 * d + 2 * 2 * m * m * d  # qkv + proj, scores + weighted sum
    mlp = 2 * 2 * m * d * h
    soft_moe = 3 * 2 * m * d * experts + experts * 2 * 2 * d * h  # logits, dispatch, combine; one slot per expert
    return 2 * m * 3 * patch * patch * d + depth * attention + (depth - moe_blocks) * mlp + moe_blocks * soft_moe


@pytest.mark.slow
def test_flops_equal_independent_counts(smoke):
    report, _ = smoke
    parts = report["parts"]
    micro = dict(m=64, d=64, depth=4, patch=4, h=256)  # micro_patch4_32: Soft MoE in the last 2 of 4 blocks
    towers = parts["towers"]["rows"]["micro_patch4_32"]
    assert towers["dense"]["eager"]["flops_per_image"] == vit_flops(**micro)
    assert towers["soft_moe"]["eager"]["flops_per_image"] == vit_flops(**micro, moe_blocks=2, experts=16)
    for n in (4, 8, 16):
        row = parts["sweep"]["rows"][f"e{n}"]["eager"]
        assert row["flops_per_image"] == vit_flops(**micro, moe_blocks=2, experts=n)
        assert row["train"]["flops"] == row["fwd_bwd"]["flops"] == 3 * row["flops_per_image"] * 4
    for row in towers.values():
        assert row["eager"]["infer"]["flops"] * 3 == row["eager"]["train"]["flops"]

    # Layers: the formula's 3x forward equals a count of the layer's forward and backward.
    s = SETTINGS["tiny"]
    for spec in layer_specs(with_lucidrains=True):
        if spec.name in parts["layer"]["rows"]["tiny"]:
            x = torch.randn(s.batch, s.m, s.d, requires_grad=True)
            with FlopCounterMode(display=False) as counter:
                spec.build(s)(x).backward(torch.randn(s.batch, s.m, s.d))
            assert parts["layer"]["rows"]["tiny"][spec.name]["eager"]["fwd_bwd"]["flops"] == counter.get_total_flops()

    # CLIP step: 3x the towers' forward, less the patch embedding's input gradient (images need none), plus the
    # sigmoid loss's b x b logits (forward and two gradients).
    for role, model_name in (("dense", "Dense-Micro-4-32-Sigmoid"), ("soft_moe", "SoftMoE-Micro-4-32-Sigmoid")):
        model, tokenizer = build_clip(model_name)
        images, text = torch.randn(4, 3, 32, 32), tokenizer([gpu_suite.CAPTION] * 4)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward, torch.no_grad():
            model.encode_image(images)
            model.encode_text(text)
        with FlopCounterMode(display=False) as patch, torch.no_grad():
            model.visual.trunk.patch_embed(images)
        expected = 3 * forward.get_total_flops() - patch.get_total_flops() + 3 * 2 * 4 * 4 * 64
        row = parts["clip"]["rows"][role]["mmsoftmoe"]["eager"]
        assert row["model"] == model_name and row["step"]["flops"] == expected
    assert (parts["clip"]["rows"]["dense"]["open_clip"]["eager"]["step"]["flops"]
            == parts["clip"]["rows"]["dense"]["mmsoftmoe"]["eager"]["step"]["flops"])


@pytest.mark.slow
def test_ratios_are_ratios_of_measured_times(smoke):
    report, _ = smoke
    rows = {name: data["rows"] for name, data in report["parts"].items()}
    derived = report["derived"]
    towers = rows["towers"]["micro_patch4_32"]
    for family, modes in towers.items():
        for what in ("train", "infer"):
            assert derived["towers"]["micro_patch4_32"][family]["eager"][what] == pytest.approx(
                per_image(modes["eager"], what) / per_image(towers["dense"]["eager"], what))
    clip = rows["clip"]["dense"]
    assert derived["clip_vs_open_clip"]["dense"]["eager"] == pytest.approx(
        clip["mmsoftmoe"]["eager"]["step"]["seconds"] / clip["open_clip"]["eager"]["step"]["seconds"])
    layer = rows["layer"]["tiny"]
    for other in ("dense", "lucidrains"):
        assert derived["layer"]["tiny"][f"soft_moe/{other}"]["eager"] == pytest.approx(
            layer["soft_moe"]["eager"]["fwd_bwd"]["seconds"] / layer[other]["eager"]["fwd_bwd"]["seconds"])
    assert derived["compile_speedup"]["layer"]["tiny/soft_moe"]["fwd_bwd"] == pytest.approx(
        layer["soft_moe"]["eager"]["fwd_bwd"]["seconds"] / layer["soft_moe"]["compiled"]["fwd_bwd"]["seconds"])
    for what in ("train", "fwd_bwd"):
        ips = {k: r["eager"][what]["batch"] / r["eager"][what]["seconds"] for k, r in rows["sweep"].items()}
        sweep = derived["sweep"]["eager"][what]
        assert list(sweep["images_per_s"]) == ["e4", "e8", "e16"]
        assert sweep["loss"] == pytest.approx(1 - ips["e16"] / ips["e4"])


@pytest.mark.slow
def test_targets_follow_from_the_figures(smoke):
    report, out = smoke
    rows, derived, targets = report["parts"]["clip"]["rows"], report["derived"], report["targets"]
    expected_per_mode = {
        "soft_moe_train_time_per_image_vs_dense": derived["towers"]["micro_patch4_32"]["soft_moe"]["eager"]["train"],
        "clip_step_mfu_dense": rows["dense"]["mmsoftmoe"]["eager"]["step"]["mfu"],
        "clip_step_mfu_soft_moe": rows["soft_moe"]["mmsoftmoe"]["eager"]["step"]["mfu"],
        "expert_sweep_loss": derived["sweep"]["eager"]["train"]["loss"],
    }
    thresholds = {"soft_moe_train_time_per_image_vs_dense": (1.15, True), "clip_step_mfu_dense": (0.40, False),
                  "clip_step_mfu_soft_moe": (0.35, False), "expert_sweep_loss": (0.10, True)}
    assert set(targets) == set(expected_per_mode)
    markdown = (out / "gpu_suite.md").read_text()
    for name, t in targets.items():
        assert t["per_mode"] == {"eager": expected_per_mode[name]}  # the smoke size compiles none of these
        assert (t["threshold"], t["at_most"]) == thresholds[name]
        assert t["value"] == expected_per_mode[name] and t["mode"] == "eager"
        assert t["met"] == (t["value"] <= t["threshold"] if t["at_most"] else t["value"] >= t["threshold"])
        assert f"| {t['description']} | {t['value']:.3f} | eager | {'yes' if t['met'] else 'NO'} |" in markdown


def test_target_takes_the_best_mode():
    upper = gpu_suite.target("t", {"eager": 1.3, "compiled": 1.1}, 1.15, at_most=True)
    assert (upper["value"], upper["mode"], upper["met"]) == (1.1, "compiled", True)
    lower = gpu_suite.target("t", {"eager": 0.3, "compiled": None}, 0.4, at_most=False)
    assert (lower["value"], lower["mode"], lower["met"]) == (0.3, "eager", False)
    assert gpu_suite.target("t", {}, 0.4, at_most=False)["met"] is None


def test_no_time_left_runs_nothing_and_says_so(tmp_path):
    report = gpu_suite.main(["--cpu-smoke", "--budget-s", "0", "--out", str(tmp_path)])
    assert all(data["not_run"].startswith("budget:") and not data["rows"] for data in report["parts"].values())
    assert all(t["value"] is None and t["met"] is None for t in report["targets"].values())
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert markdown.count("| unmeasured |") == 4 and "towers: budget:" in markdown


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_initialized(), reason="parts are spawned, not forked, once CUDA is initialised "
                    "here: the patched part would not reach them")
def test_a_part_over_its_budget_is_killed_and_keeps_its_finished_rows(tmp_path, monkeypatch, fresh_accelerate_state):
    def slow_layer(part):  # one finished row, one row too long for the budget, then a hang
        part.recorder.run(("tiny", "soft_moe", "eager"), 0, lambda: {
            "fwd_bwd": {"seconds": 0.5, "flops": 10**9, "batch": 2, "first_call_s": 0.5}, "setting": {"batch": 2}})
        part.recorder.run(("tiny", "dense", "eager"), 1000, lambda: {})
        part.recorder.data["current"] = "the hang"
        part.recorder.save()
        time.sleep(120)

    monkeypatch.setitem(gpu_suite.PARTS, "layer", slow_layer)  # the forked part process inherits it
    Accelerator(cpu=True, mixed_precision="no")  # the parent holds another precision: a part must start clean
    start = time.perf_counter()
    report = gpu_suite.main(["--cpu-smoke", "--parts", "layer", "--part-budget", "layer=6", "--out", str(tmp_path)])
    assert time.perf_counter() - start < 30
    layer = report["parts"]["layer"]
    assert layer["killed"] == "killed at its 6 s budget while measuring the hang"
    assert layer["rows"]["tiny"]["soft_moe"]["eager"]["fwd_bwd"]["samples_per_s"] == 4.0
    assert layer["skipped"]["tiny/dense/eager"].startswith("budget:")
    assert "layer: killed at its 6 s budget" in (tmp_path / "gpu_suite.md").read_text()


def test_bad_arguments_name_the_fix(capsys):
    with pytest.raises(SystemExit):
        gpu_suite.main(["--parts", "towers,nope"])
    assert "unknown parts ['nope']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_suite.main(["--part-budget", "clip"])
    assert "PART=SECONDS" in capsys.readouterr().err
