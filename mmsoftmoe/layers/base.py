"""The interface every token-mixing MLP layer of mmsoftmoe shares (Soft MoE, sparse MoEs, dense).

All layers are drop-in `mlp_layer`s for timm's ViT `Block`: they take timm's MLP arguments
(`in_features`, `hidden_features`, `out_features`, `act_layer`, `bias`, `drop`) and are called as
`layer(x, mask=None)` with x of shape (b, m, d). `mask` (b, m) marks real tokens (True) versus padding.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mmsoftmoe.layers.experts import StackedExperts
from mmsoftmoe.layers.routing_stats import RoutingStatsMixin


def check_positive(**values: float | int | None) -> None:
    """Raise a ValueError naming the first argument that is not a positive number."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast where it exists for `device` (routing math runs in float32); no-op on e.g. meta."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class ExpertLayerBase(RoutingStatsMixin, nn.Module):
    """Validates the shared arguments and builds the stacked experts of a mixture-of-experts layer."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None,
        out_features: int | None,
        num_experts: int,
        act_layer: type[nn.Module],
        bias: bool | tuple[bool, bool],
        drop: float,
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
        self.experts = StackedExperts(
            num_experts, in_features, hidden_features, out_features, act_layer, bias, drop, device, dtype
        )
        self._init_routing_stats()

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (batch, tokens, {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        if mask is not None and (mask.shape != x.shape[:2] or mask.dtype != torch.bool):
            raise ValueError(f"mask must be a bool tensor of shape {tuple(x.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
