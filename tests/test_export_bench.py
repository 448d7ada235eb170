"""The export benchmark against independent values: the FLOPs its exports report against a hand count, and its
runtimes' differences to eager against the test's own onnxruntime session on its own export of the same
checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from benchmarks import export_bench
from mmsoftmoe.export import export_checkpoint
from mmsoftmoe.models.clip import load_clip
from tests.test_export import EMBED_DIM, analytic_flops

BATCH = 2


def own_onnx_diff(checkpoint, folder) -> float:
    """Max abs difference between eager and a plain onnxruntime session, on the benchmark's inputs (seed 1)."""
    export_checkpoint(checkpoint, ["onnx"], folder)
    encoder = load_clip(checkpoint)[0].visual.eval()
    pixels = torch.randn(BATCH, 3, *encoder.image_size, generator=torch.Generator().manual_seed(1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (embeds,) = session.run(["image_embeds"], {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        return float(np.abs(embeds - encoder(pixels).numpy()).max())


@pytest.mark.slow
def test_export_bench_figures_equal_independent_ones(tmp_path, capsys):
    checkpoint = export_bench.make_checkpoint("SoftMoE-Micro-4-32", tmp_path / "checkpoint")
    out = tmp_path / "export_bench.json"
    report = export_bench.main(["--checkpoint", str(checkpoint), "--formats", "onnx", "--batch", str(BATCH),
                                "--threads", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["exports"]["onnx"]["flops_per_image"] == analytic_flops(
        d=64, m=64, depth=4, h=256, moe_blocks=2, slots=16, patch_in=3 * 4 * 4, e=EMBED_DIM)
    assert set(report["runtimes"]) == {"eager_pytorch", "onnxruntime_cpu"}
    assert report["runtimes"]["eager_pytorch"]["max_abs_diff"] == 0.0  # eager against itself: deterministic
    expected = own_onnx_diff(checkpoint, tmp_path / "own")
    assert 0.0 < expected < 1e-4
    assert report["runtimes"]["onnxruntime_cpu"]["max_abs_diff"] == pytest.approx(expected, rel=1e-6)
    assert "onnxruntime_cpu" in capsys.readouterr().out
