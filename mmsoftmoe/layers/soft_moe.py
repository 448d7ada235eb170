"""The Soft MoE layer of "From Sparse to Soft Mixtures of Experts" (Puigcerver et al., ICLR 2024).

Paper Algorithm 1 and google-research/vmoe `SoftRouter`, with the einsum legend
b batch, m tokens per example, d width, n experts, p slots per expert, s = n * p slots:

    logits_bms  = l2n(x_bmd) @ (scale * l2n(phi_dnp)).reshape(d, s)   # l2n over d
    D_bms       = softmax(logits_bms, over m)                         # dispatch: slot = mix of tokens
    C_bms       = softmax(logits_bms, over s)                         # combine: token = mix of slots
    xs_bsd      = D_bms^T @ x_bmd                                     # from the *un-normalised* input
    ys_bso      = expert_i(xs) for the p slots of expert i            # one batched contraction
    y_bmo       = C_bms @ ys_bso

Routing is per example, so an example's output never depends on the rest of the batch; no token is dropped and
there is no auxiliary loss. The logits and both softmaxes run in float32 even under autocast (the paper's
vmoe code only lowers precision around the dispatch and combine contractions, which follow `x.dtype` here).
Peak activation memory is three (b, m, s) weight tensors plus the experts' (s, h) activations per example:
nothing of size (b, m, s, d) is formed.
"""

from __future__ import annotations

import math

import torch
from timm.layers.activations import GELU, GELUTanh
from torch import nn

from mmsoftmoe.layers.base import ExpertLayerBase, autocast_off, check_positive, compute_capacity
from mmsoftmoe.layers.init import InitRule, apply_rules_, constant, lecun_normal

_L2N_EPS = 1e-6  # vmoe's `normalize`: x * rsqrt(sum(x**2) + 1e-6)
# The paper's routing ablations (section 5, Table 3): learned ("soft"), uniform, or identity (slot i = token i).
WEIGHT_MODES = ("soft", "uniform", "identity")


def gelu_approximation(act: nn.Module) -> str | None:
    """`F.gelu`'s `approximate` argument that `act` computes ("none" or "tanh"), or None if it is no GELU."""
    if isinstance(act, nn.GELU):
        return act.approximate
    return {GELU: "none", GELUTanh: "tanh"}.get(type(act))


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x * rsqrt(sum(x**2, dim) + 1e-6)`, the paper's normalisation (not F.normalize's max(norm, eps))."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + _L2N_EPS)


def resolve_slots_per_expert(
    num_experts: int, slots_per_expert: int | None, capacity_factor: float | None, num_tokens: int | None
) -> int:
    """Slots per expert p: given directly, or by a capacity factor (p = round(m * cf / n), as vmoe's SoftRouter).

    With neither given, p = 1 (the paper's best setting).
    """
    if slots_per_expert is not None and capacity_factor is not None:
        raise ValueError("give at most one of slots_per_expert or capacity_factor, "
                         f"got slots_per_expert={slots_per_expert}, capacity_factor={capacity_factor}")
    if capacity_factor is None:
        slots_per_expert = 1 if slots_per_expert is None else slots_per_expert
        check_positive(slots_per_expert=slots_per_expert)
        return int(slots_per_expert)
    check_positive(capacity_factor=capacity_factor)
    if num_tokens is None:
        raise ValueError("capacity_factor needs num_tokens (tokens per example) to size the slots")
    check_positive(num_tokens=num_tokens)
    # vmoe SoftRouter: moe.compute_capacity(group_size, num_experts, capacity_factor, 'round', multiple_of=1)
    return compute_capacity(num_tokens, num_experts, capacity_factor, "round", 1)


class SoftMoE(ExpertLayerBase):
    """Soft Mixture of Experts: every slot is a convex mix of tokens, every output a convex mix of slots.

    Args:
        in_features: Token width d.
        hidden_features: Hidden width h of each expert MLP (the paper: the dense MLP's width).
        out_features: Output width (default d).
        num_experts: Number of experts n.
        slots_per_expert: Slots p per expert (default 1, the paper's best). Exclusive with `capacity_factor`.
        capacity_factor: Alternatively, slots per expert = round(num_tokens * capacity_factor / num_experts).
        num_tokens: Tokens per example m; needed with `capacity_factor`, otherwise only checked at forward.
        normalize: L2-normalise inputs and `phi` with a learnable scale (paper section 2.3). Off reproduces
            the un-normalised variant of the paper's appendix E.
        noise_std: Std of Gaussian noise added to the logits in training (vmoe option, default off).
        dispatch, combine: "soft" (the layer), or the paper's ablations: "uniform" (every slot the mean of the
            tokens / every output the mean of the slots) or "identity" (slot i is token i; needs n * p = m).
        expert_init: "vmoe" (one shared xavier-uniform draw for every expert, as the reference) or
            "independent" (timm's MLP init per expert); see `mmsoftmoe.layers.experts`.
        act_layer, bias, drop: As timm's `Mlp`, per expert (the registered towers pass vmoe's tanh-GELU).
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool | tuple[bool, bool] = True,
        drop: float = 0.0,
        *,
        num_experts: int,
        slots_per_expert: int | None = None,
        capacity_factor: float | None = None,
        num_tokens: int | None = None,
        normalize: bool = True,
        noise_std: float = 0.0,
        dispatch: str = "soft",
        combine: str = "soft",
        expert_init: str = "vmoe",
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        slots = resolve_slots_per_expert(num_experts, slots_per_expert, capacity_factor, num_tokens)
        super().__init__(in_features, hidden_features, out_features, num_experts, act_layer, bias, drop,
                         expert_init, norm_layer, device, dtype)
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        for name, mode in (("dispatch", dispatch), ("combine", combine)):
            if mode not in WEIGHT_MODES:
                raise ValueError(f"{name} must be one of {WEIGHT_MODES}, got {mode!r}")
            if mode == "identity" and num_tokens is not None and num_experts * slots != num_tokens:
                raise ValueError(f"{name}='identity' needs num_experts * slots_per_expert == num_tokens, got "
                                 f"{num_experts} * {slots} != {num_tokens}")
        self.dispatch, self.combine = dispatch, combine
        self.slots_per_expert = slots
        self.num_slots = num_experts * slots
        self.num_tokens = num_tokens
        self.normalize = normalize
        self.noise_std = noise_std
        dd = {"device": device, "dtype": dtype}
        self.phi = nn.Parameter(torch.empty(in_features, num_experts, slots, **dd))
        self.scale = nn.Parameter(torch.ones((), **dd)) if normalize else None
        self.init_weights()

    def init_rules(self) -> dict[str, InitRule]:
        """`phi` as vmoe's `mu`: JAX's `lecun_normal()` on a (d, n, p) kernel, whose fan-in is
        `shape[-2] * prod(shape[:-2])` = n * d (`jax.nn.initializers.variance_scaling`, in_axis=-2), not d;
        `scale` 1; experts per `expert_init`."""
        rules = {"phi": InitRule(lecun_normal(self.num_experts * self.in_features))}
        if self.scale is not None:
            rules["scale"] = InitRule(constant(1.0))
        return rules | {f"experts.{name}": rule for name, rule in self.experts.init_rules().items()}

    def init_weights(self) -> None:
        apply_rules_(self, self.init_rules())

    def router_logits(self, x_bmd: torch.Tensor) -> torch.Tensor:
        """Logits (b, m, s) between tokens and slots, in float32 (float64 for float64 inputs)."""
        dtype = torch.promote_types(x_bmd.dtype, torch.float32)
        with autocast_off(x_bmd.device):
            x_bmd = x_bmd.to(dtype)
            phi_ds = self.phi.to(dtype).reshape(self.in_features, self.num_slots)
            if self.normalize:
                x_bmd = l2_normalize(x_bmd, dim=-1)
                phi_ds = self.scale.to(dtype) * l2_normalize(phi_ds, dim=0)
            logits_bms = x_bmd @ phi_ds
        if self.training and self.noise_std > 0:
            logits_bms = logits_bms + self.noise_std * torch.randn_like(logits_bms)
        return logits_bms

    def routing_weights(
        self, x: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dispatch weights (softmax over tokens) and combine weights (softmax over slots), (b, m, s) each."""
        logits_bms = self.router_logits(x)
        if mask is not None:
            # A finite fill (not -inf) keeps an all-padding example NaN-free; its outputs are zeroed in forward.
            fill = torch.finfo(logits_bms.dtype).min
            dispatch_logits = logits_bms.masked_fill(~mask[..., None], fill)
        else:
            dispatch_logits = logits_bms
        dispatch = self._ablate(self.dispatch, torch.softmax(dispatch_logits, dim=1), mask, over_tokens=True)
        combine = self._ablate(self.combine, torch.softmax(logits_bms, dim=2), mask, over_tokens=False)
        return dispatch, combine

    def _ablate(self, mode: str, soft_bms: torch.Tensor, mask: torch.Tensor | None, over_tokens: bool) -> torch.Tensor:
        """The paper's routing ablations (Table 3): replace learned weights by uniform or identity ones."""
        if mode == "soft":
            return soft_bms
        b, m, s = soft_bms.shape
        if mode == "identity":
            if m != s:
                raise ValueError(f"identity routing needs as many slots as tokens, got {s} slots for {m} tokens")
            return torch.eye(m, dtype=soft_bms.dtype, device=soft_bms.device).expand(b, m, s)
        real = torch.ones(b, m, 1, dtype=soft_bms.dtype, device=soft_bms.device) if mask is None else \
            mask[..., None].to(soft_bms.dtype)
        if over_tokens:  # every slot: the mean of the example's real tokens
            return (real / real.sum(dim=1, keepdim=True).clamp(min=1)).expand(b, m, s)
        return torch.full_like(soft_bms, 1.0 / s)  # every token: the mean of all slots

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, mask)
        b, m, d = x.shape
        dispatch_bms, combine_bms = self.routing_weights(x, mask)

        xs_bsd = dispatch_bms.to(x.dtype).transpose(1, 2) @ x
        # (b, n*p, d) -> (n, b*p, d): each expert sees its p slots of every example.
        xs_nkd = xs_bsd.view(b, self.num_experts, self.slots_per_expert, d).transpose(0, 1)
        ys_nko = self.experts(xs_nkd.reshape(self.num_experts, b * self.slots_per_expert, d))
        ys_bso = ys_nko.view(self.num_experts, b, self.slots_per_expert, -1).transpose(0, 1)
        y_bmo = combine_bms.to(ys_bso.dtype) @ ys_bso.reshape(b, self.num_slots, -1)
        if mask is not None:
            y_bmo = y_bmo * mask[..., None].to(y_bmo.dtype)
        self._record(lambda: self._stats(dispatch_bms, combine_bms, mask))
        return y_bmo

    def _stats(
        self, dispatch_bms: torch.Tensor, combine_bms: torch.Tensor, mask: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """vmoe `SoftRouter.get_metrics`, the entropies and `scale`.

        `dispatch_weights_{min,max}_mean`: each slot's min/max weight over the (real) tokens, averaged over slots
        and examples; `combine_weights_{min,max}_mean`: each real token's min/max weight over the slots, averaged
        over tokens and examples. Entropies in nats: each slot's over tokens, each real token's over slots.
        """
        real_bm1 = torch.ones_like(dispatch_bms[..., :1], dtype=torch.bool) if mask is None else mask[..., None]
        real_bm = real_bm1[..., 0].to(combine_bms.dtype)
        num_real = real_bm.sum().clamp(min=1)
        stats = {
            "dispatch_weights_min_mean": dispatch_bms.masked_fill(~real_bm1, math.inf).amin(dim=1).mean(),
            "dispatch_weights_max_mean": dispatch_bms.masked_fill(~real_bm1, -math.inf).amax(dim=1).mean(),
            "combine_weights_min_mean": (combine_bms.amin(dim=2) * real_bm).sum() / num_real,
            "combine_weights_max_mean": (combine_bms.amax(dim=2) * real_bm).sum() / num_real,
            "dispatch_entropy": torch.special.entr(dispatch_bms).sum(dim=1).mean(),
            "combine_entropy": (torch.special.entr(combine_bms).sum(dim=2) * real_bm).sum() / num_real,
        }
        if self.scale is not None:
            stats["scale"] = self.scale.detach().float()
        return stats

    def no_weight_decay(self) -> set[str]:
        """`phi` (vmoe decays `.*/kernel` only; `mu` is not a kernel) and the expert biases.

        `scale` is 0-d, so every optimizer rule here leaves it undecayed, as vmoe's image-text recipe does
        (`pretrain_laion.py`: weight decay on `.*/kernel` only); vmoe's JFT recipe decays it (0.03).
        """
        return {"phi", *super().no_weight_decay()}

    def dispatch_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Token-to-slot weights (b, m, s) of input x: what dispatch plots draw."""
        return self.routing_weights(x)[0]

    def expert_rows_per_example(self, num_tokens: int) -> int:
        return self.slots_per_expert

    def router_flops_per_example(self, num_tokens: int) -> int:
        m, d, s = num_tokens, self.in_features, self.num_slots
        return 2 * m * d * s + 2 * m * s * d + 2 * m * s * self.out_features  # logits, slots, combine

    def export_spec(self) -> dict | None:
        """The vendored Soft MoE's settings; None for the routing ablations and non-GELU experts (not vendored)."""
        gelu = gelu_approximation(self.experts.act)
        if self.dispatch != "soft" or self.combine != "soft" or gelu is None:
            return None
        return dict(num_experts=self.num_experts, slots_per_expert=self.slots_per_expert, normalize=self.normalize,
                    bias=self.experts.b1 is not None, gelu_approximate=gelu)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
                f"normalize={self.normalize}, noise_std={self.noise_std}, dispatch={self.dispatch}, "
                f"combine={self.combine}")
