"""Smoke run of the export benchmark: its JSON report holds the figures the issue's closing note asks for."""

from __future__ import annotations

import json

from benchmarks import export_bench


def test_export_bench_smoke(tmp_path, capsys):
    out = tmp_path / "export_bench.json"
    report = export_bench.main(["--formats", "onnx", "--batch", "2", "--threads", "1", "--repeats", "1",
                                "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    onnx = report["exports"]["onnx"]
    assert onnx["export_seconds"] > 0 and onnx["size_bytes"] > 0 and onnx["parity"]["max_abs_diff"] <= 1e-4
    assert set(report["runtimes"]) == {"eager_pytorch", "onnxruntime_cpu"}
    assert all(r["images_per_s"] > 0 for r in report["runtimes"].values())
    assert report["runtimes"]["onnxruntime_cpu"]["max_abs_diff"] <= 1e-4
    assert len(report["meta"]["load_before"]["loadavg_1_5_15"]) == 3
    printed = capsys.readouterr().out
    assert "onnxruntime_cpu" in printed and "images/s" in printed
