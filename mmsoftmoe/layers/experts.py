"""Stacked expert MLPs applied in one batched contraction.

Expert weights are stored stacked, `w1` of shape (n, d, h) and `w2` of shape (n, h, o), as in torchtitan's
`GroupedExperts` and the Soft MoE paper's batched experts (Puigcerver et al. 2024, section 2.1): the n expert
MLPs run as two `baddbmm` calls, never as a Python loop over experts.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StackedExperts(nn.Module):
    """n independent MLPs `o <- h <- d` (act between), each applied to its own set of k inputs.

    Input and output are laid out expert-major: x of shape (n, k, d) -> (n, k, o).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool = True,
        drop: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **dd))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **dd))
        self.b1 = nn.Parameter(torch.empty(num_experts, 1, hidden_features, **dd)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, 1, out_features, **dd)) if bias else None
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.init_weights()

    def init_weights(self) -> None:
        """timm's ViT MLP init, per expert: truncated normal (std 0.02) kernels, zero biases."""
        for w in (self.w1, self.w2):
            nn.init.trunc_normal_(w, std=0.02, a=-2 * 0.02, b=2 * 0.02)
        for b in (self.b1, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)

    def forward(self, x_nkd: torch.Tensor) -> torch.Tensor:
        h_nkh = self.drop1(self.act(self._linear(x_nkd, self.w1, self.b1)))
        return self.drop2(self._linear(h_nkh, self.w2, self.b2))

    def flops_per_input(self) -> int:
        """Multiply-adds x2 of one input row through one expert."""
        _, d, h = self.w1.shape
        return 2 * d * h + 2 * h * self.w2.shape[-1]

    def extra_repr(self) -> str:
        n, d, h = self.w1.shape
        return f"num_experts={n}, in={d}, hidden={h}, out={self.w2.shape[-1]}, bias={self.b1 is not None}"


def lecun_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """LeCun normal init (variance 1/fan_in), truncated at 2 std like JAX's `lecun_normal`."""
    # JAX's truncated normal is rescaled so the truncated distribution keeps the target std.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)
