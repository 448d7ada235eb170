"""torch.compile: every MoE layer and every CPU-size tower traces as one graph and computes what eager computes.

`fullgraph=True` raises on any graph break, so compiling at all is the no-break check; `torch._dynamo.explain`
confirms it for the layers. The numerical reference is the eager module itself, from the same weights and the
same random state (router noise draws in the same order), forward and backward, routing statistics included.
`backend="eager"` runs dynamo's captured graph as is (what fullgraph checks); `aot_eager` also traces autograd and
functionalises the graph (what inductor would receive), on the layers, where it is cheap.
"""

import copy

import pytest
import timm
import torch

import mmsoftmoe
from mmsoftmoe.layers import MOE_LAYERS, collect_aux_loss, collect_routing_stats, set_record_stats

pytestmark = pytest.mark.slow  # torch.compile traces

LAYER_KWARGS = {"soft": {"num_experts": 4, "noise_std": 0.5}, "tokens_choice": {"num_experts": 4, "top_k": 2},
                "experts_choice": {"num_experts": 4}, "dense": {}}
# Every micro tower (every layer type and routing ablation); of the mini towers, which differ from the micro ones
# in sizes only, one per layer type (each tower traces for seconds on CPU).
CPU_TOWERS = [n for n in mmsoftmoe.list_models() if "_micro_" in n] + [
    "dense_vit_mini_patch8_64", "softmoe_vit_mini_patch8_64_e32", "tokenschoice_vit_mini_patch8_64_e32_k2",
    "expertschoice_vit_mini_patch8_64_e32"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _forward_backward(module: torch.nn.Module, *inputs: torch.Tensor) -> tuple[torch.Tensor, dict, dict, list]:
    """Output, routing statistics, auxiliary loss and parameter gradients of one training forward/backward."""
    torch.manual_seed(1)  # router noise and dropout draw the same values in both runs
    module.zero_grad(set_to_none=True)
    out = module(*inputs)
    aux = collect_aux_loss(module)
    (out.square().mean() + (0.0 if aux is None else aux)).backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), collect_routing_stats(module), grads, [] if aux is None else [float(aux.detach())]


def _assert_same(eager: tuple, compiled: tuple) -> None:
    out_e, stats_e, grads_e, aux_e = eager
    out_c, stats_c, grads_c, aux_c = compiled
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    assert stats_c.keys() == stats_e.keys()
    for key in stats_e:
        assert stats_c[key] == pytest.approx(stats_e[key], abs=1e-5), key
    assert aux_c == pytest.approx(aux_e, abs=1e-6)
    assert grads_c.keys() == grads_e.keys() and grads_e
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("record_stats", [True, False])
@pytest.mark.parametrize("name", sorted(MOE_LAYERS))
def test_layer_compiles_without_graph_breaks_and_matches_eager(name, record_stats):
    torch.manual_seed(0)
    layer = MOE_LAYERS[name](16, 32, **LAYER_KWARGS[name]).train()
    layer.record_stats = record_stats
    x = torch.randn(3, 8, 16)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False  # padding goes through the masked paths of every layer
    compiled_layer = copy.deepcopy(layer)

    explained = torch._dynamo.explain(layer)(x, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1

    eager = _forward_backward(layer, x, mask)
    compiled_layer.compile(fullgraph=True, backend="aot_eager")
    compiled = _forward_backward(compiled_layer, x, mask)
    _assert_same(eager, compiled)
    if name != "dense":  # the dense MLP has no routing statistics
        assert bool(compiled[1]) == record_stats


@pytest.mark.parametrize("name", CPU_TOWERS)
def test_tower_compiles_as_one_graph_and_matches_eager(name):
    torch.manual_seed(0)
    tower = timm.create_model(name, drop_path_rate=0.1).train()  # drop-path: randomness inside the graph too
    set_record_stats(tower, True)
    side = tower.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, side, side)

    compiled_tower = copy.deepcopy(tower)
    eager = _forward_backward(tower, x)
    compiled_tower.compile(fullgraph=True, backend="eager")  # raises on any graph break
    compiled = _forward_backward(compiled_tower, x)
    _assert_same(eager, compiled)
    # A second call replays the graph without recompiling.
    with torch._dynamo.config.patch(error_on_recompile=True):
        _forward_backward(compiled_tower, x)


def test_tower_under_aot_autograd_matches_eager():
    """One Soft MoE tower through the functionalised joint graph inductor would receive."""
    torch.manual_seed(0)
    tower = timm.create_model("softmoe_vit_micro_patch4_32_e16").train()
    x = torch.randn(2, 3, 32, 32)
    compiled_tower = copy.deepcopy(tower)
    eager = _forward_backward(tower, x)
    compiled_tower.compile(fullgraph=True, backend="aot_eager")
    _assert_same(eager, _forward_backward(compiled_tower, x))
