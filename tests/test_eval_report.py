"""Results on disk: JSON round trip, the markdown table, the few-shot plot and the dispatch figure's colour scale."""

import json

import pytest
import torch
from PIL import Image

from mmsoftmoe_eval.plots import dispatch_norm, plot_dispatch
from mmsoftmoe_eval.report import markdown_table, plot_fewshot, write_report

RESULTS = {
    "digits": {
        "zeroshot": {"acc1": 0.91234, "acc5": 0.99, "mean_per_class_recall": 0.9},
        "fewshot": {
            "1shot": {"acc1": 0.5, "acc1_std": 0.05, "acc1_per_seed": [0.45, 0.5, 0.55], "l2_reg": [1024.0] * 3},
            "10shot": {"acc1": 0.8, "acc1_std": 0.01, "acc1_per_seed": [0.79, 0.8, 0.81], "l2_reg": [1024.0] * 3},
        },
        "linprobe": {"acc1": 0.95, "acc5": float("nan"), "weight_decay": 1e-4},
    }
}


def test_json_and_markdown(tmp_path):
    paths = write_report(RESULTS, tmp_path / "out", name="digits")
    loaded = json.loads(paths["json"].read_text())
    assert loaded["digits"]["fewshot"]["10shot"]["acc1_per_seed"] == [0.79, 0.8, 0.81]
    assert loaded["digits"]["linprobe"]["acc5"] is None  # NaN is not valid JSON
    table = paths["markdown"].read_text()
    assert table == markdown_table(RESULTS)
    assert "| digits / zeroshot | acc1 | 0.9123 |" in table
    assert "| digits / fewshot / 10shot | acc1_std | 0.01 |" in table
    assert "| digits / linprobe | weight_decay | 0.0001 |" in table
    assert "acc1_per_seed" not in table  # lists stay in the JSON
    assert len(table.strip().splitlines()) == 2 + 3 + 2 * 2 + 3


def test_fewshot_plot_is_a_png(tmp_path):
    curves = {"digits": RESULTS["digits"]["fewshot"], "shapes": {"5shot": {"acc1": 0.7, "acc1_std": 0.0}}}
    path = plot_fewshot(curves, tmp_path / "plots" / "fewshot.png", title="10-shot")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300


def test_dispatch_figure_shares_one_scale_centred_on_uniform(tmp_path):
    tokens = 16
    near_uniform = torch.full((2, 3, 4, 4), 1 / tokens) + 1e-4 * torch.randn(2, 3, 4, 4, generator=torch.Generator())
    norm = dispatch_norm(near_uniform, tokens)
    # One scale from 0 to the largest weight (at least 2/m), white (0.5) at 1/m: near-uniform maps stay near white.
    assert norm.vmin == 0 and norm.vcenter == 1 / tokens and norm.vmax == pytest.approx(2 / tokens)
    assert float(abs(norm(near_uniform.numpy()) - 0.5).max()) < 0.02
    peaked = torch.zeros(1, 1, 4, 4)
    peaked[0, 0, 0, 0] = 1.0
    assert dispatch_norm(peaked, tokens).vmax == 1.0
    path = plot_dispatch(torch.rand(2, 3, 8, 8), near_uniform, [0, 5, 9], tmp_path / "dispatch.png", tokens=tokens)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300
