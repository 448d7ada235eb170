"""Every tower mmsoftmoe registers in timm: architecture as the paper's configs, and timm features intact."""

import pytest
import timm
import torch

from mmsoftmoe import MoEVisionTransformer, list_models
from mmsoftmoe.layers import SoftMoE
from mmsoftmoe.models import resolve_moe_blocks
from mmsoftmoe.models.mmsoftmoe_vit import MODEL_ARGS

ALL = list_models()
# Real (non-meta) builds need small towers on CPU; larger ones are shrunk through create_model overrides.
SHRINK = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, moe_kwargs=dict(num_experts=4))


def _real_kwargs(name: str) -> dict:
    return {} if ("micro" in name or "mini" in name) else dict(SHRINK)


def test_registry_is_complete():
    assert set(ALL) == set(MODEL_ARGS)
    for size in ("small_patch16_224_e128", "base_patch16_224_e128", "large_patch16_224_e128",
                 "small_patch14_224_e256", "huge_patch14_224_e256"):
        assert f"softmoe_vit_{size}" in ALL
        assert f"dense_vit_{size.rsplit('_e', 1)[0]}" in ALL
    for size in ("small_patch16_224_e128", "base_patch16_224_e128"):
        assert {f"tokenschoice_vit_{size}_k1", f"tokenschoice_vit_{size}_k2", f"expertschoice_vit_{size}"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_full_size_architecture_on_meta(name):
    """Paper configs: MoE in the last half, expert width = dense MLP width; parameter count by formula."""
    with torch.device("meta"):
        model = timm.create_model(name)
        dense = timm.create_model(name, moe_blocks="none")
        out = model(torch.empty(2, 3, *model.pretrained_cfg["input_size"][1:]))
    assert out.shape == (2, 1000)
    depth, d = len(model.blocks), model.embed_dim
    moe = [i for i, b in enumerate(model.blocks) if not isinstance(b.mlp, type(dense.blocks[0].mlp))]
    if name.startswith("dense_"):
        assert moe == []
        return
    assert moe == list(range(depth // 2, depth))
    n = MODEL_ARGS[name]["moe_kwargs"]["num_experts"]
    h = 4 * d
    per_expert = 2 * d * h + h + d
    p = MODEL_ARGS[name]["moe_kwargs"].get("slots_per_expert", 1)
    router = d * n * p + (1 if name.startswith("softmoe") else 0)  # phi (d, n, p) [+ scale] or router (d, n)
    dense_mlp = 2 * d * h + h + d
    expected = sum(p.numel() for p in dense.parameters()) + len(moe) * (n * per_expert + router - dense_mlp)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_softmoe_s16_is_about_0_9b_parameters_like_the_paper():
    with torch.device("meta"):
        model = timm.create_model("softmoe_vit_small_patch16_224_e128")
    assert 0.85e9 < sum(p.numel() for p in model.parameters()) < 0.95e9
    blk = model.blocks[-1].mlp
    assert isinstance(blk, SoftMoE) and blk.num_experts == 128 and blk.slots_per_expert == 1
    assert blk.experts.w1.shape == (128, 384, 1536)
    assert model.global_pool == "avg" and model.cls_token is None


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_and_grad_checkpointing_parity(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **_real_kwargs(name)).eval()  # eval: no noise, no dropout
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)

    def run(checkpointing: bool):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        out = model(x)
        out.square().mean().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    out, grads = run(False)
    out_ckpt, grads_ckpt = run(True)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(out_ckpt, out)
    assert grads.keys() == grads_ckpt.keys()
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], msg=k)


def test_timm_features_keep_working():
    model = timm.create_model("softmoe_vit_micro_patch4_32_e16")
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 64)  # 8x8 patches, no class token
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats.mean(1))
    model.reset_classifier(7)
    assert model(x).shape == (2, 7)
    final, inter = model.forward_intermediates(x, indices=2)
    assert len(inter) == 2 and final.shape == feats.shape
    assert "pos_embed" in model.no_weight_decay()


def test_map_pooling_and_kwarg_overrides():
    model = timm.create_model("softmoe_vit_micro_patch4_32_e16", global_pool="map", num_classes=0,
                              moe_kwargs=dict(slots_per_expert=2))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    assert model.blocks[-1].mlp.slots_per_expert == 2 and model.blocks[-1].mlp.num_experts == 16


def test_sparse_aux_losses_survive_checkpointing():
    model = timm.create_model("tokenschoice_vit_micro_patch4_32_e16_k2").train()
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    stats = model.routing_stats()
    assert set(stats) == {"blocks.2.mlp", "blocks.3.mlp"}
    assert all(layer.aux_loss.requires_grad for layer in (model.blocks[2].mlp, model.blocks[3].mlp))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(moe_layer="switch"), "valid choices"),
        (dict(moe_blocks="first_half"), "moe_blocks"),
        (dict(moe_blocks=[0, 9]), "out of range"),
        (dict(moe_kwargs=dict(top_k=2)), "valid keys"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("softmoe_vit_micro_patch4_32_e16", **kwargs)


def test_resolve_moe_blocks():
    assert resolve_moe_blocks("last_half", 12) == (6, 7, 8, 9, 10, 11)
    assert resolve_moe_blocks("every_2", 6) == (1, 3, 5)
    assert resolve_moe_blocks([-1, 0], 4) == (0, 3)
    assert isinstance(timm.create_model("dense_vit_micro_patch4_32"), MoEVisionTransformer)
