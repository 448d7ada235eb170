"""Soft MoE against the paper's formulas written as explicit loops (Puigcerver et al. 2024, Algorithm 1)."""

import pytest
import torch
import torch.nn.functional as F

from mmsoftmoe.layers import SoftMoE


def naive_soft_moe(layer: SoftMoE, x: torch.Tensor) -> torch.Tensor:
    """Loops over examples, experts and slots; exp/sum instead of softmax; no batched contraction."""
    d, n, p = layer.phi.shape
    e = layer.experts
    out = []
    for xi in x:  # (m, d)
        xi_n = xi / torch.sqrt((xi**2).sum(-1, keepdim=True) + 1e-6)
        logits = torch.zeros(xi.shape[0], n, p, dtype=x.dtype)
        for i in range(n):
            for j in range(p):
                ph = layer.phi[:, i, j]
                ph_n = layer.scale * ph / torch.sqrt((ph**2).sum() + 1e-6)
                logits[:, i, j] = xi_n @ ph_n
        w = torch.exp(logits)
        dispatch = w / w.sum(dim=0, keepdim=True)  # over tokens
        combine = w / w.sum(dim=(1, 2), keepdim=True)  # over all slots
        y = torch.zeros(xi.shape[0], e.w2.shape[-1], dtype=x.dtype)
        for i in range(n):
            for j in range(p):
                slot = (dispatch[:, i, j, None] * xi).sum(0)  # un-normalised input
                h = F.gelu(slot @ e.w1[i] + e.b1[i, 0])
                y = y + combine[:, i, j, None] * (h @ e.w2[i] + e.b2[i, 0])
        out.append(y)
    return torch.stack(out)


def _layer(d=8, h=16, n=3, p=2, **kw):
    layer = SoftMoE(d, h, num_experts=n, slots_per_expert=p, **kw)
    with torch.no_grad():  # non-trivial biases and scale, so the reference checks them too
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
        layer.scale.fill_(2.5)
    return layer


def test_matches_naive_reference_forward_and_gradients():
    layer = _layer()
    x = torch.randn(3, 5, 8, requires_grad=True)
    y = layer(x)
    y_ref = naive_soft_moe(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(y)
    params = [x, layer.phi, layer.scale, *layer.experts.parameters()]
    grads = torch.autograd.grad(y, params, g)
    grads_ref = torch.autograd.grad(y_ref, params, g)
    for got, ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gradcheck_float64():
    layer = _layer(d=4, h=6, n=2, p=2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, phi, s: torch.func.functional_call(
        layer, {"phi": phi, "scale": s}, (x_,)), (x, layer.phi, layer.scale))


def test_weights_are_distributions():
    layer = _layer(n=4, p=3)
    dispatch, combine = layer.routing_weights(torch.randn(2, 7, 8))
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(2, 12))  # each slot: convex mix of tokens
    torch.testing.assert_close(combine.sum(dim=2), torch.ones(2, 7))  # each token: convex mix of slots
    assert (dispatch > 0).all() and (combine > 0).all()


def test_slots_from_unnormalised_input():
    # Scaling one example's input by 10 leaves the logits (normalised) unchanged, so the slots and the
    # expert inputs scale by 10: check through the dispatch weights, which must be identical.
    layer = _layer()
    x = torch.randn(1, 5, 8)
    d1, c1 = layer.routing_weights(x)
    d2, c2 = layer.routing_weights(10 * x)
    torch.testing.assert_close(d1, d2)
    torch.testing.assert_close(c1, c2)


def test_permutation_equivariant_over_tokens():
    layer = _layer()
    x = torch.randn(2, 6, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], atol=1e-6, rtol=1e-5)


def test_padding_changes_nothing():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    padded = torch.cat([x, 100 * torch.randn(2, 3, 8)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3] * 2)
    y = layer(padded, mask=mask)
    torch.testing.assert_close(y[:, :5], layer(x), atol=1e-6, rtol=1e-5)
    assert (y[:, 5:] == 0).all()


def test_all_padding_example_is_finite():
    layer = _layer()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    y = layer(torch.randn(2, 5, 8), mask=mask)
    assert torch.isfinite(y).all() and (y[1] == 0).all()


def test_capacity_factor_sets_total_slots():
    layer = SoftMoE(8, 16, num_experts=4, capacity_factor=2.0, num_tokens=10)
    assert layer.slots_per_expert == 5 and layer.phi.shape == (8, 4, 5)  # round(10 * 2 / 4)


def test_unnormalised_variant_uses_raw_dot_products():
    layer = SoftMoE(8, 16, num_experts=2, slots_per_expert=1, normalize=False)
    x = torch.randn(1, 3, 8)
    torch.testing.assert_close(layer.router_logits(x), x @ layer.phi.reshape(8, 2))
    assert layer.scale is None


def test_noise_only_in_training():
    layer = _layer(noise_std=1.0)
    x = torch.randn(2, 5, 8)
    layer.eval()
    torch.testing.assert_close(layer.router_logits(x), layer.router_logits(x))
    layer.train()
    assert not torch.allclose(layer.router_logits(x), layer.router_logits(x))


def test_stats_match_vmoe_definitions():
    # vmoe SoftRouter.get_metrics on (g, m, n, p) weights: dispatch_weights.min(axis=1).mean(),
    # combine_weights.min(axis=(2, 3)).mean(), and the same with max.
    layer = _layer(n=3, p=2)
    x = torch.randn(3, 5, 8)
    layer(x)
    dispatch, combine = (w.view(3, 5, 3, 2) for w in layer.routing_weights(x))
    stats = layer.last_stats
    torch.testing.assert_close(stats["dispatch_weights_min_mean"], dispatch.amin(dim=1).mean())
    torch.testing.assert_close(stats["dispatch_weights_max_mean"], dispatch.amax(dim=1).mean())
    torch.testing.assert_close(stats["combine_weights_min_mean"], combine.amin(dim=(2, 3)).mean())
    torch.testing.assert_close(stats["combine_weights_max_mean"], combine.amax(dim=(2, 3)).mean())
    combine = combine.flatten(2)
    entropy = -(combine * combine.log()).sum(-1).mean()
    torch.testing.assert_close(stats["combine_entropy"], entropy)
    assert stats["scale"].item() == 2.5


def test_stats_ignore_padding():
    # With padding, the statistics are vmoe's over the real tokens only: the padded example's stats equal those
    # of the same example without its padding.
    layer = _layer(n=3, p=2)
    x = torch.randn(1, 5, 8)
    padded = torch.cat([x, torch.randn(1, 2, 8)], dim=1)
    layer(x)
    reference = dict(layer.last_stats)
    layer(padded, mask=torch.tensor([[True] * 5 + [False] * 2]))
    for key, value in reference.items():
        torch.testing.assert_close(layer.last_stats[key], value, msg=key)


def test_bf16_autocast_keeps_routing_in_float32():
    layer = _layer()
    x = torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        dispatch, _ = layer.routing_weights(x)
    assert dispatch.dtype == torch.float32
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(num_experts=0), "num_experts"),
        (dict(num_experts=4, slots_per_expert=0), "slots_per_expert"),
        (dict(num_experts=4, slots_per_expert=2, capacity_factor=1.0, num_tokens=8), "capacity_factor"),
        (dict(num_experts=4, capacity_factor=1.0), "num_tokens"),
        (dict(num_experts=64, capacity_factor=0.1, num_tokens=16), "capacity_factor"),
        (dict(num_experts=4, noise_std=-1.0), "noise_std"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SoftMoE(8, 16, **kwargs)


def test_wrong_input_width_is_a_clear_error():
    layer = _layer()
    with pytest.raises(ValueError, match=r"\(batch, tokens, 8\)"):
        layer(torch.randn(2, 5, 9))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 4, dtype=torch.bool))


def test_uniform_ablations():
    layer = _layer(n=3, p=2, dispatch="uniform", combine="uniform")
    x = torch.randn(2, 5, 8)
    dispatch, combine = layer.routing_weights(x)
    torch.testing.assert_close(dispatch, torch.full((2, 5, 6), 1 / 5))
    torch.testing.assert_close(combine, torch.full((2, 5, 6), 1 / 6))
    # Every slot sees the token mean; every token gets the mean of all expert outputs: identical rows.
    y = layer(x)
    torch.testing.assert_close(y, y[:, :1].expand_as(y))
    e = layer.experts
    slot = x.mean(1)  # (b, d)
    outs = [torch.nn.functional.gelu(slot @ e.w1[i] + e.b1[i, 0]) @ e.w2[i] + e.b2[i, 0] for i in range(3)]
    torch.testing.assert_close(y[:, 0], torch.stack(outs).mean(0), atol=1e-6, rtol=1e-5)


def test_identity_ablation_routes_token_i_to_slot_i():
    layer = _layer(n=3, p=2, dispatch="identity", combine="identity", num_tokens=6)
    x = torch.randn(2, 6, 8)
    y = layer(x)
    e = layer.experts
    for t in range(6):
        i = t // 2  # slot t belongs to expert t // p
        ref = torch.nn.functional.gelu(x[:, t] @ e.w1[i] + e.b1[i, 0]) @ e.w2[i] + e.b2[i, 0]
        torch.testing.assert_close(y[:, t], ref, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="identity"):
        SoftMoE(8, 16, num_experts=4, dispatch="identity", num_tokens=6)
    with pytest.raises(ValueError, match="dispatch must be one of"):
        SoftMoE(8, 16, num_experts=4, dispatch="hard")
