"""The tower benchmark's bookkeeping (families, ratios) and the GPU suite's skip on CPU-only machines."""

import pytest
import torch

from benchmarks import gpu_suite, model_bench


def test_families_are_the_registered_twins():
    names = model_bench.family_names("small_patch16_224")
    assert names == {"dense": "dense_vit_small_patch16_224", "soft_moe": "softmoe_vit_small_patch16_224_e128",
                     "tokens_choice_k1": "tokenschoice_vit_small_patch16_224_e128_k1",
                     "experts_choice": "expertschoice_vit_small_patch16_224_e128"}
    assert set(model_bench.family_names("huge_patch14_224")) == {"dense", "soft_moe"}


def test_micro_run_ratios_are_relative_to_dense(tmp_path):
    result = model_bench.main(["--sizes", "micro_patch4_32", "--batch", "4", "--steps", "1", "--warmup", "0",
                               "--peak-size", "256", "--out", str(tmp_path / "m.json")])
    rows = result["sizes"]["micro_patch4_32"]
    assert rows["dense"]["train_time_per_image_vs_dense"] == 1.0 and rows["dense"]["params_vs_dense"] == 1.0
    soft = rows["soft_moe"]
    assert soft["params_vs_dense"] == pytest.approx(soft["params_total"] / rows["dense"]["params_total"])
    assert soft["params_total"] > 4 * rows["dense"]["params_total"]  # 16 experts in 2 of 4 blocks
    assert all(r["flops_per_image"] > 0 and r["train_peak_bytes"] > 0 for r in rows.values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_suite_skips_clearly_without_a_gpu(capsys):
    assert gpu_suite.main([]) is None
    assert "no CUDA GPU" in capsys.readouterr().err
