"""Invariants every layer of the family shares: call signature, per-example routing, statistics, timm blocks."""

import pytest
import torch
from timm.models.vision_transformer import Block

from mmsoftmoe.layers import MOE_LAYERS, collect_aux_loss, collect_routing_stats, get_moe_layer
from mmsoftmoe.models.accounting import count_flops

LAYER_KWARGS = {
    "soft": dict(num_experts=4, slots_per_expert=2),
    "tokens_choice": dict(num_experts=4, top_k=2, capacity_factor=1.0),
    "experts_choice": dict(num_experts=4, capacity_factor=1.0),
    "dense": {},
}


def _make(name):
    return get_moe_layer(name)(16, 32, **LAYER_KWARGS[name]).eval()


def test_every_registered_layer_is_covered():
    assert set(LAYER_KWARGS) == set(MOE_LAYERS)


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_example_output_is_bit_identical_whatever_the_rest_of_the_batch(name):
    layer = _make(name)
    x = torch.randn(8, 10, 16)
    other = x.clone()
    other[1:] = torch.randn(7, 10, 16)
    assert torch.equal(layer(x)[0], layer(other)[0])
    # A different batch size changes the GEMM shapes, so only float tolerance is promised there.
    torch.testing.assert_close(layer(x[:1])[0], layer(x)[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_padding_outputs_are_zero_and_real_tokens_unaffected(name):
    layer = _make(name)
    x = torch.randn(2, 6, 16)
    padded = torch.cat([x, torch.randn(2, 2, 16)], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 2] * 2)
    y = layer(padded, mask=mask)
    assert (y[:, 6:] == 0).all()
    if name in ("soft", "dense"):  # sparse capacities depend on the group size, so only these match exactly
        torch.testing.assert_close(y[:, :6], layer(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_stats_and_aux_loss_are_collected_without_knowing_the_type(name):
    layer = get_moe_layer(name)(16, 32, **LAYER_KWARGS[name]).train()
    model = torch.nn.Sequential(layer)
    model(torch.randn(2, 6, 16))
    stats = collect_routing_stats(model)
    assert all(k.startswith("router/0/") for k in stats)
    expected = {"soft": "dispatch_weights_min_mean", "tokens_choice": "dropped_fraction",
                "experts_choice": "processed_fraction", "dense": None}[name]
    assert (expected is None and stats == {}) or f"router/0/{expected}" in stats
    aux = collect_aux_loss(model)
    assert (aux is not None) == (name == "tokens_choice")


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_is_a_drop_in_timm_mlp_layer(name):
    def mlp_layer(**kw):
        return get_moe_layer(name)(**kw, **LAYER_KWARGS[name])

    block = Block(16, num_heads=2, mlp_layer=mlp_layer).eval()
    assert isinstance(block.mlp, get_moe_layer(name))
    x = torch.randn(2, 6, 16, requires_grad=True)
    y = block(x)
    h = x + block.attn(block.norm1(x))  # timm's pre-norm block written out: the layer sits where the MLP was
    torch.testing.assert_close(y, h + block.mlp(block.norm2(h)), rtol=0, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_declarations_callers_read_are_true(name):
    """What optimizers, the model card and the benchmarks ask a layer instead of checking its type."""
    layer = _make(name)
    x = torch.randn(3, 10, 16)
    assert layer.flops_per_example(10) * 3 == count_flops(lambda: layer(x))  # FlopCounterMode as the reference
    assert layer.no_weight_decay() <= dict(layer.named_parameters()).keys()
    assert not layer.routes_across_examples  # per-example routing by default (see the bit-identity test)


def test_unknown_layer_lists_choices():
    with pytest.raises(ValueError, match="valid choices: \\['dense', 'experts_choice', 'soft', 'tokens_choice'\\]"):
        get_moe_layer("switch")


@pytest.mark.parametrize("name", ["soft", "tokens_choice", "experts_choice"])
def test_statistics_can_be_switched_off_but_the_aux_loss_stays(name):
    from mmsoftmoe.layers import set_record_stats

    layer = get_moe_layer(name)(16, 32, **LAYER_KWARGS[name]).eval()  # eval: no routing noise
    model = torch.nn.Sequential(layer)
    set_record_stats(model, False)
    y_off = model(torch.ones(2, 6, 16))
    assert layer.last_stats == {}
    assert (layer.aux_loss is not None) == (name == "tokens_choice")
    set_record_stats(model, True)
    torch.testing.assert_close(model(torch.ones(2, 6, 16)), y_off)  # statistics never change the output
    assert layer.last_stats
