"""The sparse MoE baselines the Soft MoE paper compares with (google-research/vmoe `nn/routing.py`).

- Tokens Choice (V-MoE, Riquelme et al. 2021): every token picks its top-k experts; each expert has a buffer of
  C = ceil(k * S * cf / n) positions per group of S tokens, filled by cumulative count, all first choices before
  any second choice; assignments beyond capacity are dropped (the token then only passes the residual).
  Batch Priority Routing orders tokens by their top gate so low-score tokens are the ones dropped.
  Auxiliary losses (weight 0.005 each): importance = CV(sum over tokens of the gates)^2 and
  load = CV(mean over tokens of P(expert in top-k))^2, P from a normal CDF of the logit noise.
- Experts Choice (Zhou et al. 2022): every expert picks its top-C tokens, C = ceil(S * cf / n); the combine
  weight is the gate; some tokens get no expert, and the layer reports the fraction that got at least one.

Legend: G routing groups, S tokens per group, n experts, C capacity per expert and group, k choices, d width.
Routing groups are single examples (`routing="example"`, as vmoe with group size = tokens per image) or the
whole batch (`routing="batch"`, a common implementation whose outputs depend on the other examples).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmsoftmoe.layers.base import ExpertLayerBase, autocast_off, check_positive

ROUTING_CHOICES = ("example", "batch")


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis, averaged over the others (vmoe `_cv_squared`)."""
    return (x.var(dim=-1, unbiased=False) / (x.mean(dim=-1).pow(2) + 1e-10)).mean()


class SparseMoEBase(ExpertLayerBase):
    """Router (a bias-free linear map to n gates) and the grouping shared by both sparse layers."""

    def __init__(self, in_features, hidden_features, out_features, act_layer, bias, drop, *, num_experts,
                 capacity_factor, routing, noise_std, norm_layer, device, dtype) -> None:
        super().__init__(in_features, hidden_features, out_features, num_experts, act_layer, bias, drop,
                         norm_layer, device, dtype)
        check_positive(capacity_factor=capacity_factor)
        if routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}, got {routing!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.capacity_factor = capacity_factor
        self.routing = routing
        self.noise_std = noise_std
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        self.init_weights()

    def init_weights(self) -> None:
        """Router as timm's linear layers (truncated normal, std 0.02); experts as timm's MLP."""
        nn.init.trunc_normal_(self.router.weight, std=0.02, a=-0.04, b=0.04)
        self.experts.init_weights()

    def _group(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, m, d) -> (G, S, d) and a (G, S) mask of real tokens."""
        b, m, d = x.shape
        mask = torch.ones(b, m, dtype=torch.bool, device=x.device) if mask is None else mask
        if self.routing == "batch":
            return x.reshape(1, b * m, d), mask.reshape(1, b * m)
        return x, mask

    def _logits(self, x_gsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and (in training) noisy router logits (G, S, n), in float32 (float64 for float64 inputs)."""
        with autocast_off(x_gsd.device):
            dtype = torch.promote_types(x_gsd.dtype, torch.float32)
            logits = torch.nn.functional.linear(x_gsd.to(dtype), self.router.weight.to(dtype))
        if self.training and self.noise_std > 0:
            # vmoe: eps ~ N(0, (noise_std / n)^2)
            return logits, logits + torch.randn_like(logits) * (self.noise_std / self.num_experts)
        return logits, logits

    def _run_experts(self, x_gsd: torch.Tensor, token_idx: torch.Tensor, capacity: int) -> torch.Tensor:
        """Run experts on the tokens at flat indices `token_idx` (G, n, C) into (G, S) -> (G, n, C, o)."""
        g, s, d = x_gsd.shape
        n = self.num_experts
        buf = x_gsd.reshape(g * s, d)[token_idx.reshape(-1)]  # (G*n*C, d)
        buf_nkd = buf.view(g, n, capacity, d).transpose(0, 1).reshape(n, g * capacity, d)
        out_nko = self.experts(buf_nkd)
        return out_nko.view(n, g, capacity, -1).transpose(0, 1)


class TokensChoiceMoE(SparseMoEBase):
    """Tokens Choice top-k routing with buffer capacity, optional Batch Priority Routing and V-MoE aux losses.

    Args:
        num_experts: Number of experts n.
        top_k: Experts per token k.
        capacity_factor: Buffer capacity C = ceil(k * S * capacity_factor / n) per expert and group.
        batch_priority: Batch Priority Routing (tokens with a higher top gate fill the buffers first).
        routing: "example" (group = one example) or "batch" (group = the whole batch).
        noise_std: Logit noise N(0, (noise_std / n)^2) in training; needed for the load loss.
        importance_loss_weight, load_loss_weight: Weights of the auxiliary losses (V-MoE: 0.005 each).
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
        top_k: int = 1,
        capacity_factor: float = 1.0,
        batch_priority: bool = True,
        routing: str = "example",
        noise_std: float = 1.0,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
        norm_layer: type[nn.Module] | None = None,
        num_tokens: int | None = None,  # accepted for a uniform constructor; capacity is computed per call
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, act_layer, bias, drop,
                         num_experts=num_experts, capacity_factor=capacity_factor, routing=routing,
                         noise_std=noise_std, norm_layer=norm_layer, device=device, dtype=dtype)
        check_positive(top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        self.top_k = top_k
        self.batch_priority = batch_priority
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight

    def capacity(self, group_size: int) -> int:
        return max(1, math.ceil(self.top_k * group_size * self.capacity_factor / self.num_experts))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, mask)
        b, m, _ = x.shape
        x_gsd, mask_gs = self._group(x, mask)
        g, s, _ = x_gsd.shape
        n, k, cap = self.num_experts, self.top_k, self.capacity(s)
        logits, noisy = self._logits(x_gsd)
        gates_gsn = torch.softmax(noisy, dim=-1)
        top_gate_gsk, top_expert_gsk = gates_gsn.topk(k, dim=-1)

        # Order in which tokens claim buffer positions: choice-major, and within a choice by priority.
        order_gs = self._priority_order(top_gate_gsk[..., 0], mask_gs)
        expert_gks = top_expert_gsk.gather(1, order_gs[..., None].expand(-1, -1, k)).transpose(1, 2)
        valid_gks = mask_gs.gather(1, order_gs)[:, None, :].expand(-1, k, -1)
        onehot = torch.nn.functional.one_hot(expert_gks.reshape(g, k * s), n) * valid_gks.reshape(g, k * s, 1)
        position = ((onehot.cumsum(dim=1) - 1) * onehot).sum(dim=-1).view(g, k, s)
        kept_gks = valid_gks & (position < cap)

        # Buffer (G, n, C) of flat token indices; unfilled positions point at token 0 with zero weight.
        token_gks = (order_gs + torch.arange(g, device=x.device)[:, None] * s)[:, None, :].expand(-1, k, -1)
        slot = torch.where(kept_gks, expert_gks * cap + position, n * cap)  # n*cap = a discard bin
        token_idx = torch.zeros(g, n * cap + 1, dtype=torch.long, device=x.device)
        token_idx.scatter_(1, slot.reshape(g, -1), token_gks.reshape(g, -1))
        weight = torch.zeros(g, n * cap + 1, dtype=gates_gsn.dtype, device=x.device)
        gate_gks = top_gate_gsk.gather(1, order_gs[..., None].expand(-1, -1, k)).transpose(1, 2)
        weight.scatter_(1, slot.reshape(g, -1), torch.where(kept_gks, gate_gks, 0.0).reshape(g, -1))
        token_idx, weight = token_idx[:, :-1], weight[:, :-1]

        out_gnco = self._run_experts(x_gsd, token_idx.view(g, n, cap), cap)
        out = out_gnco.reshape(g * n * cap, -1) * weight.reshape(-1, 1).to(out_gnco.dtype)
        y = out.new_zeros(g * s, out.shape[-1]).index_add_(0, token_idx.reshape(-1), out)
        aux, importance, load = self._aux_loss(logits, noisy, gates_gsn, mask_gs)
        self._record(lambda: self._stats(mask_gs, kept_gks, expert_gks, cap, importance, load), aux)
        return y.view(b, m, -1)

    def _priority_order(self, top_gate_gs: torch.Tensor, mask_gs: torch.Tensor) -> torch.Tensor:
        """Token order (G, S): by descending top gate with BPR (padding last), else positional."""
        if not self.batch_priority:
            return torch.arange(top_gate_gs.shape[1], device=top_gate_gs.device).expand_as(top_gate_gs)
        score = torch.where(mask_gs, top_gate_gs, -1.0)
        return torch.argsort(score, dim=1, descending=True, stable=True)

    def _aux_loss(self, logits, noisy, gates_gsn, mask_gs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted V-MoE auxiliary loss, and its importance and load terms."""
        real = mask_gs[..., None].to(gates_gsn.dtype)
        importance = cv_squared((gates_gsn * real).sum(dim=1))
        load = self._load_loss(logits, noisy, real) if (self.training and self.noise_std > 0) else \
            importance.new_zeros(())
        return self.importance_loss_weight * importance + self.load_loss_weight * load, importance, load

    def _stats(self, mask_gs, kept_gks, expert_gks, cap, importance, load) -> dict[str, torch.Tensor]:
        num_real = mask_gs.sum().clamp(min=1)
        # kept_gks is in priority order, like mask_gs reordered; a token is processed if any choice is kept.
        processed = kept_gks.any(dim=1).sum()
        per_expert = torch.zeros(self.num_experts, device=mask_gs.device).index_add_(
            0, expert_gks.reshape(-1), kept_gks.reshape(-1).float())
        return {
            "dropped_fraction": 1.0 - processed / num_real,
            "assignments_kept_fraction": kept_gks.sum() / (num_real * self.top_k),
            "expert_load_max": per_expert.max() / (cap * mask_gs.shape[0]),  # fullest buffer, fraction
            "expert_load_cv": cv_squared(per_expert).sqrt(),
            "importance_loss": importance,
            "load_loss": load,
        }

    def _load_loss(self, logits, noisy, real):
        """vmoe `_load_loss`: P(expert e in top-k) = 1 - Phi((threshold - clean logit) / sigma)."""
        sigma = self.noise_std / self.num_experts
        threshold = noisy.topk(self.top_k, dim=-1).values[..., -1:]
        p = 1.0 - torch.special.ndtr((threshold - logits) / sigma)
        p_mean = (p * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
        return cv_squared(p_mean)


class ExpertsChoiceMoE(SparseMoEBase):
    """Experts Choice routing: each expert takes its top-C tokens of the group, weighted by their gates.

    Args:
        num_experts: Number of experts n.
        capacity_factor: C = ceil(S * capacity_factor / n) tokens per expert and group (n * C ~ cf * S).
        routing: "example" (group = one example) or "batch" (group = the whole batch).
        noise_std: Logit noise N(0, (noise_std / n)^2) in training (default off: Zhou et al. use none).
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
        capacity_factor: float = 1.0,
        routing: str = "example",
        noise_std: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        num_tokens: int | None = None,  # accepted for a uniform constructor; capacity is computed per call
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, act_layer, bias, drop,
                         num_experts=num_experts, capacity_factor=capacity_factor, routing=routing,
                         noise_std=noise_std, norm_layer=norm_layer, device=device, dtype=dtype)

    def capacity(self, group_size: int) -> int:
        return min(group_size, max(1, math.ceil(group_size * self.capacity_factor / self.num_experts)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, mask)
        b, m, _ = x.shape
        x_gsd, mask_gs = self._group(x, mask)
        g, s, _ = x_gsd.shape
        n, cap = self.num_experts, self.capacity(s)
        _, noisy = self._logits(x_gsd)
        gates_gsn = torch.softmax(noisy, dim=-1)
        # Padding scores -1 so it is chosen only when an expert has more capacity than real tokens.
        score_gns = torch.where(mask_gs[..., None], gates_gsn, -1.0).transpose(1, 2)
        gate_gnc, token_gnc = score_gns.topk(cap, dim=-1)
        weight_gnc = gate_gnc.clamp(min=0.0)
        token_idx = token_gnc + torch.arange(g, device=x.device)[:, None, None] * s

        out_gnco = self._run_experts(x_gsd, token_idx, cap)
        out = out_gnco.reshape(g * n * cap, -1) * weight_gnc.reshape(-1, 1).to(out_gnco.dtype)
        y = out.new_zeros(g * s, out.shape[-1]).index_add_(0, token_idx.reshape(-1), out)
        self._record(lambda: self._stats(token_idx, weight_gnc, mask_gs))
        return y.view(b, m, -1)

    def _stats(self, token_idx, weight_gnc, mask_gs) -> dict[str, torch.Tensor]:
        per_token = torch.zeros(mask_gs.numel(), device=mask_gs.device).index_add_(
            0, token_idx.reshape(-1), (weight_gnc > 0).reshape(-1).float())
        processed = ((per_token > 0) & mask_gs.reshape(-1)).sum() / mask_gs.sum().clamp(min=1)
        return {
            "processed_fraction": processed,
            "dropped_fraction": 1.0 - processed,
            "experts_per_token_max": per_token.max(),
        }
