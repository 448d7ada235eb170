"""Stacked expert MLPs applied in one batched contraction, initialised as vmoe does.

Expert weights are stored stacked, `w1` of shape (n, d, h) and `w2` of shape (n, h, o), as in torchtitan's
`GroupedExperts` and the Soft MoE paper's batched experts (Puigcerver et al. 2024, section 2.1): the n expert
MLPs run as two `baddbmm` calls, never as a Python loop over experts.

Initialisation (`expert_init`):
- "vmoe" (default): the reference's. vmoe wraps vit_jax's `MlpBlock` (xavier-uniform kernels, N(0, 1e-6) biases)
  in a vmap with `split_rngs=False` (`vmoe/nn/vit_moe.py`, every Soft MoE / Experts Choice config in
  `vmoe/projects/soft_moe/configs/common.py`): all experts start from **one shared draw**, and only the routing
  (different slots, different inputs) makes them differ.
- "independent": timm's ViT MLP init drawn separately for every expert (truncated normal, std 0.02, zero biases).
"""

from __future__ import annotations

import torch
from torch import nn

from mmsoftmoe.layers.init import InitRule, apply_rules_, constant, normal, trunc_normal, xavier_uniform

EXPERT_INITS = ("vmoe", "independent")
_VMOE_BIAS_STD = 1e-6  # vit_jax MlpBlock: bias_init = normal(stddev=1e-6)


class StackedExperts(nn.Module):
    """n MLPs `o <- h <- d` (act between), each applied to its own set of k inputs.

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
        expert_init: str = "vmoe",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if expert_init not in EXPERT_INITS:
            raise ValueError(f"expert_init must be one of {EXPERT_INITS}, got {expert_init!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_experts = num_experts
        self.expert_init = expert_init
        self.w1 = nn.Parameter(torch.empty(num_experts, in_features, hidden_features, **dd))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_features, out_features, **dd))
        self.b1 = nn.Parameter(torch.empty(num_experts, 1, hidden_features, **dd)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_experts, 1, out_features, **dd)) if bias else None
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.drop2 = nn.Dropout(drop)
        self.init_weights()

    def init_rules(self) -> dict[str, InitRule]:
        """See the module docstring: one shared vmoe draw, or timm's init per expert."""
        if self.expert_init == "independent":
            # timm's init_weights_vit_timm: truncated normal with bounds +-2 absolute (100 std), zero biases.
            weight, bias = InitRule(trunc_normal(0.02), "independent"), InitRule(constant(0.0), "independent")
        else:  # xavier over one expert's (d, h) kernel, as flax sees it under the vmap
            weight, bias = InitRule(xavier_uniform(), "shared"), InitRule(normal(_VMOE_BIAS_STD), "shared")
        rules = {"w1": weight, "w2": weight}
        if self.b1 is not None:
            rules.update(b1=bias, b2=bias)
        return rules

    def init_weights(self) -> None:
        apply_rules_(self, self.init_rules())

    def no_weight_decay(self) -> set[str]:
        """The biases: (n, 1, h)-shaped, so a `ndim < 2` rule would miss them."""
        return {name for name in ("b1", "b2") if getattr(self, name) is not None}

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
        return (f"num_experts={n}, in={d}, hidden={h}, out={self.w2.shape[-1]}, bias={self.b1 is not None}, "
                f"expert_init={self.expert_init}")

