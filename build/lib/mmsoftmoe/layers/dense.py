"""The dense MLP behind the same interface as the MoE layers (timm's `Mlp`, plus a padding mask)."""

from __future__ import annotations

import torch
from timm.layers import Mlp
from torch import nn

from mmsoftmoe.layers.routing_stats import RoutingStatsMixin


class DenseMLP(RoutingStatsMixin, Mlp):
    """timm's ViT MLP, callable as `layer(x, mask=None)`; it has no routing, so its statistics are empty."""

    uses_all_parameters = True

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool | tuple[bool, bool] = True,
        drop: float = 0.0,
        *,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, act_layer, norm_layer, bias, drop,
                         device=device, dtype=dtype)
        self._init_routing_stats()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = super().forward(x)
        return y if mask is None else y * mask[..., None].to(y.dtype)

    def no_weight_decay(self) -> set[str]:
        """Nothing beyond the biases, which every optimizer rule here skips as 1-d parameters."""
        return set()

    def flops_per_example(self, num_tokens: int) -> int:
        """Forward matmul FLOPs (2 per multiply-add) for one example: fc1 and fc2 on every token."""
        return 2 * num_tokens * (self.fc1.in_features * self.fc1.out_features
                                 + self.fc2.in_features * self.fc2.out_features)

    def export_spec(self) -> dict:
        """timm's `Mlp` as it is: the vendored ViT keeps its own MLP here."""
        return {}
