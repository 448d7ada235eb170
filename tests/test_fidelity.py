"""mmsoftmoe's defaults against the values of the reference code, google-research/vmoe.

Sources: `vmoe/projects/soft_moe/router.py` (`SoftRouter`: `mu_init=lecun_normal()`), `vmoe/nn/vit_moe.py` and
vit_jax's `MlpBlock` (experts vmapped with `split_rngs=False`: xavier-uniform kernels, N(0, 1e-6) biases, flax's
tanh-approximate `nn.gelu`), `vmoe/projects/soft_moe/configs/common.py` and `pretrain_laion.py` (weight decay on
`.*/kernel` only). Weight decay is checked under pretraining and fine-tuning against one explicit list.
"""

import math

import pytest
import timm
import torch
from timm.layers.activations import GELUTanh

import mmsoftmoe  # noqa: F401  (registers the towers)
from mmsoftmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe_eval.finetune import FinetuneConfig, build_finetune_optimizer
from mmsoftmoe_training.optim import build_optimizer

TOWER = "softmoe_vit_micro_patch4_32_e16"  # depth 4, Soft MoE in blocks 2 and 3


def jax_fan_in(shape: tuple[int, ...]) -> int:
    """`jax.nn.initializers.variance_scaling`'s `_compute_fans` with in_axis=-2: shape[-2] * receptive field."""
    receptive = math.prod(shape) // (shape[-2] * shape[-1])
    return shape[-2] * receptive


def test_phi_init_is_jax_lecun_normal_with_fan_in_n_times_d():
    d, n, p = 256, 64, 4
    layer = SoftMoE(d, 16, num_experts=n, slots_per_expert=p)
    assert jax_fan_in(tuple(layer.phi.shape)) == n * d
    # std of 65536 draws: relative standard error ~0.3%; 3% tolerance. The old fan-in d would be 8x larger.
    assert layer.phi.std().item() == pytest.approx(1 / math.sqrt(n * d), rel=0.03)
    assert layer.phi.abs().max().item() <= 2 / math.sqrt(n * d) / 0.87962566103423978 + 1e-7  # truncated at 2 std
    assert layer.scale.item() == 1.0


@pytest.mark.parametrize("layer_cls", [SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE])
def test_experts_share_one_xavier_draw_with_tiny_biases(layer_cls):
    d, h, n = 96, 384, 8
    experts = layer_cls(d, h, num_experts=n).experts
    for w in (experts.w1, experts.w2):
        assert torch.equal(w, w[:1].expand_as(w))  # split_rngs=False: every expert the same
        bound = math.sqrt(6 / (d + h))  # xavier_uniform on one expert's (d, h) kernel
        assert w.abs().max().item() <= bound
        assert w[0].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    for b in (experts.b1, experts.b2):
        assert torch.equal(b, b[:1].expand_as(b))
        assert 0 < b.std().item() < 3e-6  # N(0, 1e-6)


def test_independent_expert_init_is_the_named_alternative():
    experts = SoftMoE(96, 384, num_experts=8, expert_init="independent").experts
    assert not torch.equal(experts.w1[0], experts.w1[1])
    # timm's dense MLP init (init_weights_vit_timm): trunc_normal_(std=.02) with timm's absolute bounds +-2, i.e.
    # a plain N(0, 0.02^2); the experts replace such MLPs, so they are drawn alike (a 2-std truncation gave 0.0176).
    dense = timm.create_model(TOWER).blocks[0].mlp.fc1.weight
    assert experts.w1.std().item() == pytest.approx(0.02, rel=0.03)
    assert experts.w1.std().item() == pytest.approx(dense.std().item(), rel=0.05)
    assert (experts.b1 == 0).all()
    with pytest.raises(ValueError, match="expert_init"):
        SoftMoE(8, 8, num_experts=2, expert_init="xavier")


def test_towers_use_tanh_gelu_and_exact_is_an_override():
    model = timm.create_model(TOWER)
    assert isinstance(model.blocks[0].mlp.act, GELUTanh) and isinstance(model.blocks[3].mlp.experts.act, GELUTanh)
    x = torch.randn(5, 7)
    torch.testing.assert_close(model.blocks[3].mlp.experts.act(x), torch.nn.functional.gelu(x, approximate="tanh"))
    exact = timm.create_model(TOWER, act_layer="gelu")
    torch.testing.assert_close(exact.blocks[3].mlp.experts.act(x), torch.nn.functional.gelu(x))


def _tower_kernels(head: bool) -> set[str]:
    """vmoe's `.*/kernel`: every matmul / conv weight of the micro tower, experts included."""
    names = {"patch_embed.proj.weight", *(["head.weight"] if head else [])}
    for i in range(4):
        names |= {f"blocks.{i}.attn.qkv.weight", f"blocks.{i}.attn.proj.weight"}
        mlp = ("experts.w1", "experts.w2") if i >= 2 else ("fc1.weight", "fc2.weight")
        names |= {f"blocks.{i}.mlp.{w}" for w in mlp}
    return names


def _decayed(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> tuple[set[str], set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    return decay, no_decay


def test_pretraining_decays_exactly_the_kernels_of_the_image_tower():
    model, _ = build_clip("SoftMoE-Micro-4-32")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    decay, no_decay = _decayed(optimizer, model)
    prefix = "visual.trunk."
    tower = {n[len(prefix):] for n, _ in model.named_parameters() if n.startswith(prefix)}
    assert {n[len(prefix):] for n in decay if n.startswith(prefix)} == _tower_kernels(head=False)
    assert {n[len(prefix):] for n in no_decay if n.startswith(prefix)} == tower - _tower_kernels(head=False)
    assert {"visual.trunk.blocks.3.mlp.phi", "visual.trunk.blocks.3.mlp.scale", "visual.trunk.blocks.3.mlp.experts.b1",
            "visual.trunk.pos_embed", "logit_scale"} <= no_decay


def test_finetuning_decays_the_same_parameters_through_timms_factory():
    model = timm.create_model(TOWER, num_classes=3)
    decay, no_decay = _decayed(build_finetune_optimizer(model, FinetuneConfig()), model)
    assert decay == _tower_kernels(head=True)
    assert no_decay == {n for n, _ in model.named_parameters()} - _tower_kernels(head=True)
