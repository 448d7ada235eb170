"""Tokens Choice and Experts Choice against loop references of vmoe's routing rules (docs/design.md, section 3).

Capacities follow vmoe `moe.compute_capacity` (written out again in `vmoe_capacity`), the aux losses
`vmoe/nn/routing.py`'s `NoisyTopExpertsPerItemRouter`, Experts Choice the Soft MoE paper's config
(`vmoe/projects/soft_moe/configs/common.py`, `get_vmoe_experts_choose_config`).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from mmsoftmoe.layers import ExpertsChoiceMoE, TokensChoiceMoE


def vmoe_capacity(num_tokens: int, num_experts: int, capacity_factor: float, ceil_or_round: str,
                  multiple_of: int) -> int:
    """vmoe `compute_capacity`: ceil or round of tokens * cf / experts, then up to a multiple of `multiple_of`."""
    exact = num_tokens * capacity_factor / num_experts
    capacity = int(math.ceil(exact)) if ceil_or_round == "ceil" else int(round(exact))
    return capacity + (-capacity) % multiple_of


def expert(layer, e: int, v: torch.Tensor) -> torch.Tensor:
    ex = layer.experts
    return F.gelu(v @ ex.w1[e] + ex.b1[e, 0]) @ ex.w2[e] + ex.b2[e, 0]


def naive_tokens_choice(layer: TokensChoiceMoE, x: torch.Tensor, mask=None):
    """Per group: tokens in priority order claim buffer positions, first choices before second choices."""
    groups = [x.reshape(-1, x.shape[-1])] if layer.routing == "batch" else list(x)
    masks = [torch.ones(len(g), dtype=torch.bool) for g in groups] if mask is None else (
        [mask.reshape(-1)] if layer.routing == "batch" else list(mask))
    outs, dropped, real = [], 0, 0
    for g, gm in zip(groups, masks, strict=True):
        s = g.shape[0]
        cap = vmoe_capacity(layer.top_k * s, layer.num_experts, layer.capacity_factor, "ceil",
                            layer.capacity_multiple_of)
        gates = torch.softmax(g @ layer.router.weight.T, dim=-1)
        top_g, top_e = gates.topk(layer.top_k, dim=-1)
        order = list(range(s))
        if layer.batch_priority:
            order = sorted(range(s), key=lambda t: -top_g[t, 0].item())
        fill = [0] * layer.num_experts
        y = torch.zeros(s, layer.out_features)
        kept_any = [False] * s
        for j in range(layer.top_k):
            for t in order:
                if not gm[t]:
                    continue
                e = int(top_e[t, j])
                if fill[e] < cap:
                    fill[e] += 1
                    y[t] = y[t] + top_g[t, j] * expert(layer, e, g[t])
                    kept_any[t] = True
        dropped += sum(1 for t in range(s) if gm[t] and not kept_any[t])
        real += int(gm.sum())
        outs.append(y)
    return torch.cat(outs).reshape(*x.shape[:2], -1), dropped / real


def naive_experts_choice(layer: ExpertsChoiceMoE, x: torch.Tensor):
    groups = [x.reshape(-1, x.shape[-1])] if layer.routing == "batch" else list(x)
    outs, processed, total = [], 0, 0
    for g in groups:
        s = g.shape[0]
        cap = min(s, vmoe_capacity(s, layer.num_experts, layer.capacity_factor, layer.capacity_ceil_or_round,
                                   layer.capacity_multiple_of))
        gates = torch.softmax(g @ layer.router.weight.T, dim=-1)
        y = torch.zeros(s, layer.out_features)
        chosen = set()
        for e in range(layer.num_experts):
            for t in gates[:, e].topk(cap).indices.tolist():
                y[t] = y[t] + gates[t, e] * expert(layer, e, g[t])
                chosen.add(t)
        processed += len(chosen)
        total += s
        outs.append(y)
    return torch.cat(outs).reshape(*x.shape[:2], -1), processed / total


def _biased(layer):
    with torch.no_grad():
        layer.router.weight.normal_(0, 1.0)  # decisive gates
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    return layer.eval()


@pytest.mark.parametrize("routing", ["example", "batch"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("batch_priority", [True, False])
@pytest.mark.parametrize(("capacity_factor", "multiple_of"), [(0.5, 1), (1.0, 1), (0.5, 4)])
def test_tokens_choice_matches_loop_reference(routing, top_k, batch_priority, capacity_factor, multiple_of):
    layer = _biased(TokensChoiceMoE(6, 12, num_experts=4, top_k=top_k, capacity_factor=capacity_factor,
                                    capacity_multiple_of=multiple_of, batch_priority=batch_priority,
                                    routing=routing))
    x = torch.randn(3, 7, 6)
    y_ref, dropped_ref = naive_tokens_choice(layer, x)
    torch.testing.assert_close(layer(x), y_ref, atol=1e-5, rtol=1e-5)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(dropped_ref)


def test_tokens_choice_hand_built_drop():
    # Four tokens all prefer expert 0; capacity ceil(1 * 4 * 1 / 2) = 2 per expert.
    layer = TokensChoiceMoE(2, 4, num_experts=2, top_k=1, capacity_factor=1.0, capacity_multiple_of=1,
                            batch_priority=True).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))  # logit_0 = x[0], logit_1 = 0
    x = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]]])
    y = layer(x)
    # Priority by top gate: tokens 3 and 1 (largest x[0]) take expert 0's two positions; 0 and 2 are dropped.
    assert (y[0, 0] == 0).all() and (y[0, 2] == 0).all()
    for t in (1, 3):
        gate = torch.sigmoid(x[0, t, 0])  # softmax([x0, 0])[0]
        torch.testing.assert_close(y[0, t], gate * expert(layer, 0, x[0, t]))
    assert layer.last_stats["dropped_fraction"].item() == 0.5
    # Without priority, positional order: tokens 0 and 1 are kept.
    layer.batch_priority = False
    y = layer(x)
    assert (y[0, 0] != 0).any() and (y[0, 2] == 0).all() and (y[0, 3] == 0).all()


def test_tokens_choice_first_choices_before_second():
    # Capacity 1 per expert (ceil(2 * 2 * 0.5 / 2)); token 1's *first* choice must beat token 0's second.
    layer = TokensChoiceMoE(2, 4, num_experts=2, top_k=2, capacity_factor=0.5, capacity_multiple_of=1,
                            batch_priority=False).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])  # token 0 -> expert 0 first, token 1 -> expert 1 first
    y = layer(x)
    g = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0]
    torch.testing.assert_close(y[0, 0], g * expert(layer, 0, x[0, 0]))
    torch.testing.assert_close(y[0, 1], g * expert(layer, 1, x[0, 1]))
    assert layer.last_stats["assignments_kept_fraction"].item() == 0.5


def test_tokens_choice_padding_is_never_routed():
    layer = _biased(TokensChoiceMoE(6, 12, num_experts=4, top_k=2, capacity_factor=0.5, capacity_multiple_of=1))
    x = torch.randn(2, 7, 6)
    mask = torch.tensor([[True] * 5 + [False] * 2] * 2)
    y_ref, dropped_ref = naive_tokens_choice(layer, x, mask)
    y = layer(x, mask=mask)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert (y[:, 5:] == 0).all()
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(dropped_ref)


def test_aux_losses_match_formulas():
    torch.manual_seed(1)
    n = 4
    layer = TokensChoiceMoE(6, 12, num_experts=n, top_k=2, noise_std=1.0).train()
    x = torch.randn(3, 7, 6)
    torch.manual_seed(5)
    layer(x)
    torch.manual_seed(5)
    logits = x @ layer.router.weight.T
    noisy = logits + torch.randn_like(logits) * (1.0 / n)
    imp = torch.softmax(logits, -1).sum(1)  # (G, n): vmoe's importance loss takes the clean gates
    importance = (imp.var(-1, unbiased=False) / imp.mean(-1) ** 2).mean()
    threshold = noisy.topk(2, -1).values[..., 1:]
    normal = torch.distributions.Normal(0.0, 1.0)
    p = 1 - normal.cdf((threshold - logits) / (1.0 / n))
    pm = p.mean(1)
    load = (pm.var(-1, unbiased=False) / pm.mean(-1) ** 2).mean()
    torch.testing.assert_close(layer.last_stats["importance_loss"], importance, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.last_stats["load_loss"], load, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.aux_loss, 0.005 * (importance + load), atol=1e-7, rtol=1e-5)
    assert layer.aux_loss.requires_grad


@pytest.mark.parametrize("routing", ["example", "batch"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 2.0])
def test_experts_choice_matches_loop_reference(routing, capacity_factor):
    layer = _biased(ExpertsChoiceMoE(6, 12, num_experts=4, capacity_factor=capacity_factor, routing=routing))
    x = torch.randn(3, 7, 6)
    y_ref, processed_ref = naive_experts_choice(layer, x)
    torch.testing.assert_close(layer(x), y_ref, atol=1e-5, rtol=1e-5)
    assert layer.last_stats["processed_fraction"].item() == pytest.approx(processed_ref)
    assert layer.last_stats["dropped_fraction"].item() == pytest.approx(1 - processed_ref)


@pytest.mark.parametrize(
    ("make", "tokens", "expected"),
    [  # hand-computed from vmoe's rules
        (lambda: TokensChoiceMoE(8, 8, num_experts=128, top_k=1), 196, 4),  # ceil(196 / 128) = 2 -> 4
        (lambda: TokensChoiceMoE(8, 8, num_experts=16, top_k=2), 64, 8),  # ceil(128 / 16) = 8
        (lambda: TokensChoiceMoE(8, 8, num_experts=4, top_k=1, capacity_factor=1.25), 20, 8),  # 7 -> 8
        (lambda: ExpertsChoiceMoE(8, 8, num_experts=128), 196, 2),  # round(1.53) = 2
        (lambda: ExpertsChoiceMoE(8, 8, num_experts=32), 64, 2),
        (lambda: ExpertsChoiceMoE(8, 8, num_experts=8, capacity_factor=1.1), 20, 3),  # round(2.75)
        (lambda: ExpertsChoiceMoE(8, 8, num_experts=8, capacity_factor=1.0), 20, 2),  # round(2.5): half to even
    ],
)
def test_capacity_follows_vmoe_defaults(make, tokens, expected):
    assert make().capacity(tokens) == expected


def test_experts_choice_has_vmoe_noise_in_training_only():
    layer = ExpertsChoiceMoE(6, 12, num_experts=4)
    assert layer.noise_std == 1.0
    x = torch.randn(2, 7, 6)
    assert not torch.equal(layer.train()(x), layer(x))  # noise: two training calls differ
    assert torch.equal(layer.eval()(x), layer(x))


def test_experts_choice_overlap_drops_tokens():
    # Four experts of capacity 1 (round(4 tokens / 4)); three of them have their largest gate at the same token.
    layer = ExpertsChoiceMoE(2, 4, num_experts=4, capacity_factor=1.0).eval()
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-3.0, 0.0]]))
    x = torch.tensor([[[0.1, 0.0], [0.2, 0.0], [0.3, 0.0], [2.0, 0.0]]])
    layer(x)
    # capacity 1: experts 0-2 all pick token 3 (largest gate); expert 3 picks token 0.
    assert layer.last_stats["processed_fraction"].item() == 0.5
    assert layer.last_stats["experts_per_token_max"].item() == 3


@pytest.mark.parametrize("make", [
    lambda: TokensChoiceMoE(6, 12, num_experts=4, top_k=2, capacity_factor=0.5),
    lambda: ExpertsChoiceMoE(6, 12, num_experts=4, capacity_factor=0.5),
])
def test_per_example_routing_has_no_batch_effect(make):
    layer = _biased(make())
    x = torch.randn(4, 7, 6)
    other = x.clone()
    other[1:] = torch.randn(3, 7, 6)
    assert torch.equal(layer(x)[0], layer(other)[0])


def test_batch_routing_shows_batch_effect():
    layer = _biased(TokensChoiceMoE(6, 12, num_experts=4, top_k=1, capacity_factor=0.5, routing="batch"))
    x = torch.randn(4, 7, 6)
    other = x.clone()
    other[1:] = torch.randn(3, 7, 6) * 3
    assert not torch.allclose(layer(x)[0], layer(other)[0])


@pytest.mark.parametrize(
    ("cls", "kwargs", "name"),
    [
        (TokensChoiceMoE, dict(num_experts=4, top_k=5), "top_k"),
        (TokensChoiceMoE, dict(num_experts=4, top_k=0), "top_k"),
        (TokensChoiceMoE, dict(num_experts=4, capacity_factor=0.0), "capacity_factor"),
        (TokensChoiceMoE, dict(num_experts=4, routing="global"), "routing"),
        (ExpertsChoiceMoE, dict(num_experts=0), "num_experts"),
        (ExpertsChoiceMoE, dict(num_experts=4, capacity_factor=-1.0), "capacity_factor"),
    ],
)
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(6, 12, **kwargs)
