"""Sparse upcycling: every copied tensor equals its dense source, every expert equals the dense MLP, routers fresh."""

import pytest
import timm
import torch
from safetensors.torch import save_file

import mmsoftmoe  # noqa: F401  (registers the towers)
from mmsoftmoe.checkpoint import read_state_dict_file
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.models.upcycle import upcycle_


@pytest.mark.parametrize("moe_name", ["softmoe_vit_micro_patch4_32_e16", "tokenschoice_vit_micro_patch4_32_e16_k1"])
def test_upcycled_tower_copies_the_dense_vit(moe_name):
    dense = timm.create_model("dense_vit_micro_patch4_32", num_classes=10)
    moe = timm.create_model(moe_name, num_classes=10)
    fresh = {k: v.clone() for k, v in moe.state_dict().items()}
    report = upcycle_(moe, dense.state_dict())
    d, m = dense.state_dict(), moe.state_dict()
    for name in report.copied:
        assert torch.equal(m[name], d[name]), name
    for i in moe.moe_block_indices:
        experts = moe.blocks[i].mlp.experts
        for e in range(experts.num_experts):  # each expert is the dense MLP of its block
            assert torch.equal(experts.w1[e], d[f"blocks.{i}.mlp.fc1.weight"].t())
            assert torch.equal(experts.w2[e], d[f"blocks.{i}.mlp.fc2.weight"].t())
            assert torch.equal(experts.b1[e, 0], d[f"blocks.{i}.mlp.fc1.bias"])
            assert torch.equal(experts.b2[e, 0], d[f"blocks.{i}.mlp.fc2.bias"])
    assert report.fresh and all(torch.equal(m[k], fresh[k]) for k in report.fresh)  # routers untouched
    assert all(".mlp." in k and f"blocks.{k.split('.')[1]}" in {f"blocks.{i}" for i in moe.moe_block_indices}
               for k in report.fresh)
    assert set(report.copied) | set(report.upcycled) | set(report.fresh) == set(m)
    assert report.unused == []  # every dense tensor found a place (the MoE blocks' MLPs as experts)


def test_upcycles_from_an_open_clip_checkpoint_file(tmp_path):
    dense_clip, _ = build_clip("Dense-Micro-4-32")
    path = tmp_path / "dense_clip.safetensors"
    save_file({k: v.contiguous() for k, v in dense_clip.state_dict().items()}, str(path))
    moe = timm.create_model("softmoe_vit_micro_patch4_32_e16", num_classes=0)
    report = upcycle_(moe, read_state_dict_file(path))
    trunk = dense_clip.visual.trunk.state_dict()
    assert torch.equal(moe.patch_embed.proj.weight, trunk["patch_embed.proj.weight"])
    assert torch.equal(moe.blocks[3].mlp.experts.w1[5], trunk["blocks.3.mlp.fc1.weight"].t())
    assert "blocks.0.attn.qkv.weight" in report.copied


def test_mismatched_sizes_and_non_vit_checkpoints_are_refused():
    moe = timm.create_model("softmoe_vit_micro_patch4_32_e16")
    mini = timm.create_model("dense_vit_mini_patch8_64")
    with pytest.raises(ValueError, match="upcycle from a dense ViT of the same size"):
        upcycle_(moe, mini.state_dict())
    with pytest.raises(ValueError, match="the dense checkpoint is not a ViT"):
        upcycle_(moe, {"weight": torch.zeros(2)})


def test_a_damaged_dense_checkpoint_is_a_user_error_naming_it(tmp_path):
    from mmsoftmoe.checkpoint import CheckpointError

    path = tmp_path / "dense.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="dense.safetensors is damaged"):
        read_state_dict_file(path)
