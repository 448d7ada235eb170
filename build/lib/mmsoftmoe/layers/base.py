"""The interface every token-mixing MLP layer of mmsoftmoe shares (Soft MoE, sparse MoEs, dense).

All layers are drop-in `mlp_layer`s for timm's ViT `Block`: they take timm's MLP arguments
(`in_features`, `hidden_features`, `out_features`, `act_layer`, `bias`, `drop`) and are called as
`layer(x, mask=None)` with x of shape (b, m, d). `mask` (b, m) marks real tokens (True) versus padding.

Besides their routing statistics (`routing_stats.py`), layers declare what callers need to know about them, so a
new layer type needs no edits elsewhere: `no_weight_decay()` (timm's name: the parameters an optimizer must not
decay), `flops_per_example(num_tokens)`, `expert_rows_per_example(num_tokens)` and `uses_all_parameters` (the
model card's counts), and `export_spec()` (what the self-contained `hf` export rebuilds the layer from).
"""

from __future__ import annotations

import abc
import contextlib
import math

import torch
from torch import nn

from mmsoftmoe.layers.experts import StackedExperts
from mmsoftmoe.layers.routing_stats import RoutingStatsMixin

CEIL_OR_ROUND = ("ceil", "round")


def check_positive(**values: float | int | None) -> None:
    """Raise a ValueError naming the first argument that is not a positive number."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float, ceil_or_round: str,
                     multiple_of: int) -> int:
    """Rows per expert for `num_tokens` tokens split over `num_experts` (vmoe `moe.compute_capacity`).

    `ceil` or `round` of num_tokens * capacity_factor / num_experts, then rounded up to a multiple of `multiple_of`
    ("to try to avoid padding"; vmoe's default is 4 for its sparse dispatchers, 1 for the Soft MoE router).
    """
    exact = num_tokens * capacity_factor / num_experts
    capacity = math.ceil(exact) if ceil_or_round == "ceil" else round(exact)
    if capacity < 1:
        raise ValueError(
            f"capacity_factor={capacity_factor} gives {exact:.3g} rows per expert for {num_tokens} tokens and "
            f"{num_experts} experts, which {ceil_or_round}s to 0; raise capacity_factor to at least "
            f"{0.5 * num_experts / num_tokens:.3g} or use fewer experts")
    return capacity + (-capacity) % multiple_of


def check_capacity_options(ceil_or_round: str, multiple_of: int) -> None:
    if ceil_or_round not in CEIL_OR_ROUND:
        raise ValueError(f"capacity_ceil_or_round must be one of {CEIL_OR_ROUND}, got {ceil_or_round!r}")
    check_positive(capacity_multiple_of=multiple_of)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast where it exists for `device` (routing math runs in float32); no-op on e.g. meta."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class ExpertLayerBase(RoutingStatsMixin, nn.Module, metaclass=abc.ABCMeta):
    """Validates the shared arguments and builds the stacked experts of a mixture-of-experts layer."""

    uses_all_parameters = True  # every expert processes rows of every example (False for sparse routing)

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None,
        out_features: int | None,
        num_experts: int,
        act_layer: type[nn.Module],
        bias: bool | tuple[bool, bool],
        drop: float,
        expert_init: str,
        norm_layer: type[nn.Module] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        check_positive(in_features=in_features, hidden_features=hidden_features, num_experts=num_experts)
        if norm_layer is not None:
            raise ValueError("norm_layer (timm's scale_mlp_norm) is not supported by MoE layers; leave it off")
        if isinstance(bias, tuple):
            if bias[0] != bias[1]:
                raise ValueError(f"bias must be the same for both expert layers, got {bias}")
            bias = bias[0]
        self.in_features = in_features
        self.out_features = out_features
        self.num_experts = num_experts
        self.experts = StackedExperts(num_experts, in_features, hidden_features, out_features, act_layer, bias, drop,
                                      expert_init, device, dtype)
        self._init_routing_stats()

    def no_weight_decay(self) -> set[str]:
        """Names of this layer's parameters that get no weight decay: the expert biases, as for any bias."""
        return {f"experts.{name}" for name in self.experts.no_weight_decay()}

    @abc.abstractmethod
    def expert_rows_per_example(self, num_tokens: int) -> int:
        """Rows each expert processes per example of `num_tokens` tokens (slots, or buffer capacity)."""

    @abc.abstractmethod
    def router_flops_per_example(self, num_tokens: int) -> int:
        """Matmul FLOPs of the routing (logits, dispatch, combine) for one example."""

    def flops_per_example(self, num_tokens: int) -> int:
        """Forward matmul FLOPs (2 per multiply-add) for one example of `num_tokens` tokens.

        Empty buffer positions of sparse layers count: they are computed.
        """
        rows = self.num_experts * self.expert_rows_per_example(num_tokens)
        return self.router_flops_per_example(num_tokens) + rows * self.experts.flops_per_input()

    def export_spec(self) -> dict | None:
        """What the `hf` export's vendored code rebuilds this layer from; None: no vendored code for it."""
        return None

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, tokens, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        if mask is not None and (mask.shape != x.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
