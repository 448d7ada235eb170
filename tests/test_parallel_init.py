"""Sharding-invariant initialisation: the distributions of today's constructors, values set by (seed, name) alone,
and sharded start-ups at 1, 2 and 4 processes (ep 1/2/4, FSDP2, HSDP) bit-equal to the one-process build."""

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.distributed as dist
from torch import nn

from mmsoftmoe.models.clip import build_clip, resolve_clip_config
from mmsoftmoe.models.init import init_rules, init_weights_
from tests._parallel_init import MODELS, SEED, sharded_weights
from tests.test_parallel import torchrun

ROOT = Path(__file__).resolve().parents[1]


def constructor_build(name: str) -> nn.Module:
    """The model as open_clip's and timm's constructors initialise it (the reference distributions)."""
    cfg = resolve_clip_config(name)
    return open_clip.CLIP(**cfg, output_dict=True)


def assert_same_distribution(name: str, got: torch.Tensor, reference: torch.Tensor) -> None:
    """Constants exactly; random draws by their bounds, mean and spread (tolerances from the sample sizes)."""
    assert got.shape == reference.shape, name
    if reference.numel() == 1 or reference.std() == 0:
        assert torch.equal(got, reference), name
        return
    assert not torch.equal(got, reference), f"{name}: same values, not a fresh draw"
    spread = reference.std().item()
    assert got.abs().max() <= reference.abs().max() * 1.5 + 1e-7, name
    if reference.numel() >= 4000:  # sample std within ~3% at this size, 5 standard errors
        assert got.std().item() == pytest.approx(spread, rel=0.12), name
        assert abs(got.mean().item() - reference.mean().item()) < 0.1 * spread, name


@pytest.mark.parametrize("name", ["SoftMoE-Micro-4-32-Sigmoid", "TokensChoiceK1-Micro-4-32", "Dense-Micro-4-32"])
def test_one_process_build_keeps_the_constructors_distributions(name):
    torch.manual_seed(1)
    reference = dict(constructor_build(name).named_parameters())
    model, _ = build_clip(name)
    for pname, param in model.named_parameters():
        assert_same_distribution(pname, param.detach(), reference[pname].detach())


@pytest.mark.parametrize("expert_init", ["vmoe", "independent"])
def test_expert_draws_follow_expert_init(expert_init):
    """vmoe: one draw shared by every expert; independent: a draw per expert, as the constructor's."""
    tower = "softmoe_vit_micro_patch4_32_e16"
    torch.manual_seed(1)
    reference = timm.create_model(tower, moe_kwargs=dict(expert_init=expert_init))
    model = init_weights_(timm.create_model(tower, moe_kwargs=dict(expert_init=expert_init)), seed=SEED)
    w1 = model.blocks[3].mlp.experts.w1.detach()
    assert torch.equal(w1[0], w1[1]) == (expert_init == "vmoe")
    for pname, param in model.named_parameters():
        assert_same_distribution(pname, param.detach(), reference.get_parameter(pname).detach())


def test_values_are_a_function_of_seed_and_name():
    """The same seed gives the same model; another seed other values; a tower initialised alone (other names)
    differs from the same tower inside the CLIP model."""
    torch.manual_seed(SEED)
    a = build_clip(MODELS[0])[0].state_dict()
    b = init_weights_(build_clip(MODELS[0])[0], seed=SEED).state_dict()
    c = init_weights_(build_clip(MODELS[0])[0], seed=SEED + 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.trunk.blocks.0.attn.qkv.weight"], c["visual.trunk.blocks.0.attn.qkv.weight"])


def test_a_parameter_without_a_rule_is_named():
    model = nn.Sequential(nn.Linear(2, 2), nn.Bilinear(2, 2, 2))
    with pytest.raises(ValueError, match=r"no per-parameter initialisation rule for \['1.weight', '1.bias'\]"):
        init_rules(model)


def one_process_group_weights() -> dict[str, torch.Tensor]:
    """FSDP2 over a group of one process (what a sharded run started without a launcher uses)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return {f"{name}/1,1,1/{k}": v for name in MODELS for k, v in sharded_weights(name, "1,1,1").items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sharded_start_ups_equal_the_one_process_build(tmp_path):
    layouts = {1: ["1,1,1"], 2: ["1,2,1", "1,2,2"], 4: ["1,4,1", "1,4,2", "1,4,4", "2,2,2"]}
    sharded = one_process_group_weights()
    sharded |= (torchrun(tmp_path, 2, layouts[2], "_parallel_init.py", timeout=600)
                | torchrun(tmp_path, 4, layouts[4], "_parallel_init.py", timeout=600))
    for name in MODELS:
        torch.manual_seed(SEED)
        model, _ = build_clip(name)
        expected = model.state_dict() | {"attn_mask": model.attn_mask}
        for layout in sum(layouts.values(), []):
            for key, value in expected.items():
                assert torch.equal(sharded[f"{name}/{layout}/{key}"], value), f"{name} {layout} {key}"


def test_buffers_a_meta_build_leaves_empty_get_their_constructors_values(tmp_path, monkeypatch):
    """open_clip's causal mask and a Hugging Face text tower's position / token-type ids (non-persistent: no
    checkpoint holds them), as a sharded evaluation of such a checkpoint fills them; another buffer is named."""
    from mmsoftmoe.models.clip import build_clip_from_config, save_clip
    from mmsoftmoe.parallel.init import init_buffers_
    from tests.test_clip_models import _tiny_hf_encoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_hf_encoder(tmp_path / "bert")
    hf, _ = build_clip("SoftMoE-Micro-4-32", text_model=tmp_path / "bert")
    save_clip(hf, resolve_clip_config("SoftMoE-Micro-4-32", tmp_path / "bert"), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "open_clip_config.json").read_text())["model_cfg"]
    for reference, cfg, folder in ((build_clip("SoftMoE-Micro-4-32")[0], resolve_clip_config("SoftMoE-Micro-4-32"),
                                    None), (hf, config, tmp_path / "ckpt")):
        meta, _ = build_clip_from_config(cfg, device="meta", folder=folder)
        meta.to_empty(device="cpu")
        init_buffers_(meta)
        expected = dict(reference.named_buffers())
        assert expected and {n for n, _ in meta.named_buffers()} == set(expected)
        for name, buffer in meta.named_buffers():
            assert torch.equal(buffer, expected[name]), name
    meta.text.register_buffer("inv_freq", torch.empty(4))
    with pytest.raises(ValueError, match=r"buffer text.inv_freq has no known starting value"):
        init_buffers_(meta)
