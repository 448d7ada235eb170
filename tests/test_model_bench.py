"""The tower benchmark against independent counts (FLOPs by hand, parameters by a plain sum, a step's gradients as a
memory floor), and the GPU suite's skip on CPU-only machines."""

import json

import pytest
import timm
import torch

from benchmarks import gpu_suite, model_bench
from tests.test_gpu_suite import vit_flops

MICRO = dict(m=64, d=64, depth=4, patch=4, h=256)  # micro_patch4_32: Soft MoE (16 experts) in the last 2 of 4 blocks


def test_families_are_the_registered_twins():
    names = model_bench.family_names("small_patch16_224")
    assert names == {"dense": "dense_vit_small_patch16_224", "soft_moe": "softmoe_vit_small_patch16_224_e128",
                     "tokens_choice_k1": "tokenschoice_vit_small_patch16_224_e128_k1",
                     "experts_choice": "expertschoice_vit_small_patch16_224_e128"}
    assert set(model_bench.family_names("huge_patch14_224")) == {"dense", "soft_moe"}


@pytest.mark.slow
def test_micro_run_counts_equal_independent_counts(tmp_path):
    out = tmp_path / "m.json"
    result = model_bench.main(["--sizes", "micro_patch4_32", "--batch", "4", "--steps", "1", "--warmup", "0",
                               "--peak-size", "256", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result["sizes"]["micro_patch4_32"]
    assert rows["dense"]["flops_per_image"] == vit_flops(**MICRO)
    assert rows["soft_moe"]["flops_per_image"] == vit_flops(**MICRO, moe_blocks=2, experts=16)
    for family, name in model_bench.family_names("micro_patch4_32").items():
        params = [p for p in timm.create_model(name, num_classes=0).parameters()]
        assert rows[family]["params_total"] == sum(p.numel() for p in params), family
        # A training step holds a fresh fp32 gradient for every parameter at once (set to None between steps).
        assert rows[family]["train_peak_bytes"] >= 4 * rows[family]["params_total"], family
    # The Soft MoE blocks swap 2 MLPs (d*h + h + h*d + d each) for 16 expert MLPs and a router (d x 16 slots).
    mlp = 2 * 64 * 256 + 256 + 64
    assert rows["soft_moe"]["params_total"] - rows["dense"]["params_total"] == 2 * (15 * mlp + 64 * 16 + 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_suite_skips_clearly_without_a_gpu(capsys):
    assert gpu_suite.main([]) is None
    assert "no CUDA GPU" in capsys.readouterr().err
