"""The layer benchmark's FLOP counts and memory probe against hand computations, and a smoke run of its main."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common
from benchmarks import layer_bench as lb
from benchmarks.common import peak_alloc_bytes

# A hand-sized config: b 2 examples, m 8 tokens, d 4, h 16, n 4 experts, p 2 slots each (s 8).
B, M, D, H, N, P = 2, 8, 4, 16, 4, 2


def _flops(name: str, s: lb.Setting) -> int:
    return next(spec for spec in lb.layer_specs(False) if spec.name == name).flops(s)


HAND = lb.Setting("hand", d=D, m=M, n=N, p=P, h=H, batch=B)


def test_dense_flops_by_hand():
    # fc1: 2*8 tokens x 4 x 16 multiply-adds, fc2 the same; 2 FLOPs each: 2 * 2 * 256 * 4 = 4096.
    assert _flops("dense", HAND) == 4096


def test_soft_moe_flops_by_hand():
    # Per example: logits 8x4x8, slots 8x8x4, combine 8x8x4 multiply-adds = 3 * 256 -> 1536 FLOPs;
    # experts: 8 slots x (4x16 + 16x4) multiply-adds = 1024 -> 2048 FLOPs. Two examples: 2 * 3584.
    assert _flops("soft_moe", HAND) == 7168


def test_sparse_flops_by_hand():
    # Router: 2*8 tokens x 4 x 4 multiply-adds = 256 -> 512 FLOPs. Tokens Choice: capacity ceil(8 / 4) = 2, rounded up
    # to vmoe's multiple of 4 -> 4 rows; 2 groups x 4 experts x 4 rows, each (4x16 + 16x4) multiply-adds -> 8192.
    assert _flops("tokens_choice", HAND) == 512 + 8192
    # Experts Choice: capacity round(8 / 4) = 2 rows -> 4096 FLOPs.
    assert _flops("experts_choice", HAND) == 512 + 4096


def test_s16_flops():
    s = lb.SETTINGS["s16"]
    assert _flops("dense", s) == 14_797_504_512
    assert _flops("soft_moe", s) == 11_513_364_480


def test_peak_alloc_bytes_counts_live_tensors():
    assert peak_alloc_bytes(lambda: torch.ones(250_000)) == 1_000_000
    assert peak_alloc_bytes(lambda: torch.ones(250_000).exp()) == 2_000_000  # input and output live at once


def test_memory_bound_adds_three_routing_tensors():
    s = lb.Setting("t", d=D, m=M, n=N, p=P, h=H, batch=B)
    layers = {name: {"peak_forward_bytes_no_grad": v, "peak_forward_bytes_grad": 2 * v}
              for name, v in (("dense", 1000), ("soft_moe", 1500))}
    bound = lb.memory_bound(s, layers)
    assert bound["no_grad"]["bound_bytes"] == 1000 + 3 * B * M * N * P * 4
    assert bound["no_grad"]["within"] and bound["grad"]["within"]


@pytest.mark.slow
def test_main_report_is_consistent_with_its_own_measurements(tmp_path):
    """The figures printed are derived correctly: GFLOP/s from the hand-counted FLOPs and the measured median,
    % of peak from the measured GEMM peak, ratios from the medians."""
    out = tmp_path / "bench.json"
    lb.main(["--settings", "tiny", "--repeats", "1", "--warmup", "0", "--peak-size", "256", "--out", str(out)])
    report = json.loads(out.read_text())
    assert {"torch_version", "threads", "thp", "load_before", "load_after"} <= report["meta"].keys()
    result = report["settings"]["tiny"]
    s = lb.Setting(**result["config"])
    peak = result["peak"]["mm_gflops"]
    layers = result["layers"]
    assert {"soft_moe", "dense", "tokens_choice", "experts_choice"} <= layers.keys()
    for name, flops in (("soft_moe", _flops("soft_moe", s)), ("dense", _flops("dense", s))):
        r = layers[name]
        assert r["forward_gflop"] == pytest.approx(flops / 1e9)
        for key, factor in (("forward", 1), ("forward_backward", lb.FWD_BWD_FLOP_FACTOR)):
            gflops = factor * flops / r[key]["median_s"] / 1e9
            assert r[key]["gflops"] == pytest.approx(gflops)
            assert r[key]["pct_peak"] == pytest.approx(100 * gflops / peak)
    for key in ("forward", "forward_backward"):
        expected = layers["soft_moe"][key]["median_s"] / layers["dense"][key]["median_s"]
        assert result["ratios"]["soft_moe/dense"][key] == pytest.approx(expected)


def test_time_median_is_the_median_of_the_timed_calls_after_warmup(monkeypatch):
    """Each call advances a fake clock by its own duration: the timer reports the median and min of exactly the
    calls after the warm-up."""
    durations, clock = iter([9.0, 9.0, 3.0, 1.0, 2.0]), {"now": 0.0}
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["now"])

    def call() -> None:
        clock["now"] += next(durations)

    timing = common.time_median(call, repeats=3, warmup=2)
    assert (timing["median_s"], timing["min_s"]) == (2.0, 1.0)


def test_write_results_adds_the_load_after_and_writes_what_it_prints(tmp_path, capsys):
    load, warning = common.check_machine()
    report = {"meta": {"load_before": load, "load_warning": warning, "threads": 1}, "rows": [1, 2]}
    out = tmp_path / "deep" / "r.json"
    assert common.write_results(report, "TABLE", out, meta=report["meta"]) is report
    assert set(report["meta"]) == {"load_before", "load_warning", "load_after", "threads"}
    assert json.loads(out.read_text()) == report
    printed = capsys.readouterr().out
    assert json.loads(printed[:printed.index("\nTABLE\n")]) == report and f"wrote {out}" in printed


def test_checkpoint_bench_charges_each_save_to_the_step_after_it():
    from benchmarks.checkpoint_bench import summarise

    # Saves after steps 3 and 6 (every 3 of 8): steps 4 and 7 carry them; step 1 (warm-up) is left out.
    seconds = {1: 9.0, 2: 1.0, 3: 1.2, 4: 3.0, 5: 1.1, 6: 0.9, 7: 5.0, 8: 1.0}
    summary = summarise(seconds, every=3, steps=8)
    assert summary["after_save_s"] == 4.0  # median of 3.0 and 5.0
    assert summary["other_s"] == 1.0  # median of 1.0, 1.2, 1.1, 0.9, 1.0
    assert summary["stall_s"] == 3.0
