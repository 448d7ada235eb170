"""The sparse MoE baselines the Soft MoE paper compares with (google-research/vmoe `nn/routing.py`, `moe.py`).

- Tokens Choice (V-MoE, Riquelme et al. 2021; vmoe `NoisyTopExpertsPerItemRouter`): every token picks its top-k
  experts by the noisy gates; each expert has a buffer of C positions per group of S tokens, C = ceil(k * S * cf / n)
  rounded up to a multiple of 4 (vmoe `compute_capacity`'s defaults), filled by cumulative count, all first choices
  before any second choice; assignments beyond capacity are dropped (the token then only passes the residual).
  Batch Priority Routing orders tokens by their top gate so low-score tokens are the ones dropped.
  Auxiliary losses (weight 0.005 each): importance = CV(sum over tokens of the **clean** gates softmax(W x))^2 and
  load = CV(mean over tokens of P(expert in top-k))^2, P from a normal CDF of the logit noise.
- Experts Choice (Zhou et al. 2022; vmoe `NoisyTopItemsPerExpertRouter` as configured for the Soft MoE paper in
  `projects/soft_moe/configs/common.py`): gates with logit noise std 1.0 / n in training; every expert picks its
  top-C tokens, C = round(S * cf / n) (`capacity_ceil_or_round='round'`, `capacity_multiple_of=1`, "what is used in
  the soft router, for a fair comparison"); the combine weight is the gate; some tokens get no expert.

Legend: b batch, m tokens, g routing groups, s tokens per group, n experts, c capacity per expert and group,
k choices, d width, o output width. Routing groups are single examples (`routing="example"`, as vmoe with group size
= tokens per image) or the whole batch (`routing="batch"`, a common implementation whose outputs depend on the
other examples).
"""

from __future__ import annotations

import torch
from torch import nn

from mmsoftmoe.layers.base import (
    ExpertLayerBase,
    autocast_off,
    check_capacity_options,
    check_positive,
    compute_capacity,
)
from mmsoftmoe.layers.init import InitRule, apply_rules_, lecun_normal

ROUTING_CHOICES = ("example", "batch")


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation over the last axis, averaged over the others (vmoe: std / mean, squared)."""
    return (x.var(dim=-1, unbiased=False) / (x.mean(dim=-1).pow(2) + 1e-10)).mean()


class SparseMoEBase(ExpertLayerBase):
    """Router (a bias-free linear map to n gates), capacity and grouping shared by both sparse layers."""

    uses_all_parameters = False  # an example's tokens reach only the experts that took them

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None,
        out_features: int | None,
        act_layer: type[nn.Module],
        bias: bool | tuple[bool, bool],
        drop: float,
        *,
        num_experts: int,
        capacity_factor: float,
        capacity_ceil_or_round: str,
        capacity_multiple_of: int,
        routing: str,
        noise_std: float,
        expert_init: str,
        norm_layer: type[nn.Module] | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, num_experts, act_layer, bias, drop,
                         expert_init, norm_layer, device, dtype)
        check_positive(capacity_factor=capacity_factor)
        check_capacity_options(capacity_ceil_or_round, capacity_multiple_of)
        if routing not in ROUTING_CHOICES:
            raise ValueError(f"routing must be one of {ROUTING_CHOICES}, got {routing!r}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.capacity_factor = capacity_factor
        self.capacity_ceil_or_round = capacity_ceil_or_round
        self.capacity_multiple_of = capacity_multiple_of
        self.routing = routing
        self.noise_std = noise_std
        self.router = nn.Linear(in_features, num_experts, bias=False, device=device, dtype=dtype)
        self.init_weights()

    def init_rules(self) -> dict[str, InitRule]:
        """Router as vmoe's flax `nn.Dense` (LeCun normal, fan-in d); experts per `expert_init`."""
        rules = {"router.weight": InitRule(lecun_normal(self.in_features))}
        return rules | {f"experts.{name}": rule for name, rule in self.experts.init_rules().items()}

    def init_weights(self) -> None:
        apply_rules_(self, self.init_rules())

    @property
    def routes_across_examples(self) -> bool:
        return self.routing == "batch"

    def assignments_per_group(self, group_size: int) -> int:
        """Token-expert assignments a group of `group_size` tokens asks for (k * s for Tokens Choice)."""
        return group_size

    def capacity(self, group_size: int) -> int:
        """Buffer positions per expert and routing group of `group_size` tokens (vmoe `compute_capacity`)."""
        return compute_capacity(self.assignments_per_group(group_size), self.num_experts, self.capacity_factor,
                                self.capacity_ceil_or_round, self.capacity_multiple_of)

    def expert_rows_per_example(self, num_tokens: int) -> int:
        return self.capacity(num_tokens)

    def router_flops_per_example(self, num_tokens: int) -> int:
        return 2 * num_tokens * self.in_features * self.num_experts

    def _group(self, x_bmd: torch.Tensor, mask_bm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, m, d) -> (g, s, d) and a (g, s) mask of real tokens."""
        b, m, d = x_bmd.shape
        mask_bm = torch.ones(b, m, dtype=torch.bool, device=x_bmd.device) if mask_bm is None else mask_bm
        if self.routing == "batch":
            return x_bmd.reshape(1, b * m, d), mask_bm.reshape(1, b * m)
        return x_bmd, mask_bm

    def _logits(self, x_gsd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and (in training) noisy router logits (g, s, n), in float32 (float64 for float64 inputs)."""
        with autocast_off(x_gsd.device):
            dtype = torch.promote_types(x_gsd.dtype, torch.float32)
            logits_gsn = torch.nn.functional.linear(x_gsd.to(dtype), self.router.weight.to(dtype))
        if self.training and self.noise_std > 0:
            # vmoe: eps ~ N(0, (noise_std / n)^2)
            return logits_gsn, logits_gsn + torch.randn_like(logits_gsn) * (self.noise_std / self.num_experts)
        return logits_gsn, logits_gsn

    def _run_experts(self, x_gsd: torch.Tensor, token_gnc: torch.Tensor, weight_gnc: torch.Tensor) -> torch.Tensor:
        """Experts on the tokens at flat indices `token_gnc` into (g*s), outputs weighted and summed per token.

        Returns (g*s, o); positions of weight 0 (unfilled buffer slots) add nothing.
        """
        g, s, d = x_gsd.shape
        n, c = self.num_experts, token_gnc.shape[-1]
        buf_gncd = x_gsd.reshape(g * s, d)[token_gnc.reshape(-1)].view(g, n, c, d)
        out_nko = self.experts(buf_gncd.transpose(0, 1).reshape(n, g * c, d))
        out_gnco = out_nko.view(n, g, c, -1).transpose(0, 1)
        out_ko = out_gnco.reshape(g * n * c, -1) * weight_gnc.reshape(-1, 1).to(out_gnco.dtype)
        return out_ko.new_zeros(g * s, out_ko.shape[-1]).index_add_(0, token_gnc.reshape(-1), out_ko)


class TokensChoiceMoE(SparseMoEBase):
    """Tokens Choice top-k routing with buffer capacity, optional Batch Priority Routing and V-MoE aux losses.

    Args:
        num_experts: Number of experts n.
        top_k: Experts per token k.
        capacity_factor: Buffer capacity C = ceil(k * s * capacity_factor / n) per expert and group of s tokens.
        capacity_ceil_or_round, capacity_multiple_of: vmoe's rounding of C (default "ceil", then up to a multiple
            of 4, vmoe's default); ("ceil", 1) gives the exact ceil(k s cf / n).
        batch_priority: Batch Priority Routing (tokens with a higher top gate fill the buffers first).
        routing: "example" (group = one example) or "batch" (group = the whole batch).
        noise_std: Logit noise N(0, (noise_std / n)^2) in training; needed for the load loss.
        importance_loss_weight, load_loss_weight: Weights of the auxiliary losses (V-MoE: 0.005 each).
        expert_init: "vmoe" or "independent" (see `mmsoftmoe.layers.experts`).
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
        capacity_ceil_or_round: str = "ceil",
        capacity_multiple_of: int = 4,
        batch_priority: bool = True,
        routing: str = "example",
        noise_std: float = 1.0,
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
        expert_init: str = "vmoe",
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, act_layer, bias, drop,
                         num_experts=num_experts, capacity_factor=capacity_factor,
                         capacity_ceil_or_round=capacity_ceil_or_round, capacity_multiple_of=capacity_multiple_of,
                         routing=routing, noise_std=noise_std, expert_init=expert_init, norm_layer=norm_layer,
                         device=device, dtype=dtype)
        check_positive(top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} exceeds num_experts={num_experts}")
        self.top_k = top_k
        self.batch_priority = batch_priority
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight

    def assignments_per_group(self, group_size: int) -> int:
        return self.top_k * group_size

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, mask)
        b, m, _ = x.shape
        x_gsd, mask_gs = self._group(x, mask)
        g, s, _ = x_gsd.shape
        n, k, cap = self.num_experts, self.top_k, self.capacity(s)
        logits_gsn, noisy_gsn = self._logits(x_gsd)
        gates_gsn = torch.softmax(noisy_gsn, dim=-1)
        top_gate_gsk, top_expert_gsk = gates_gsn.topk(k, dim=-1)

        # Order in which tokens claim buffer positions: choice-major, and within a choice by priority.
        order_gs = self._priority_order(top_gate_gsk[..., 0], mask_gs)
        expert_gks = top_expert_gsk.gather(1, order_gs[..., None].expand(-1, -1, k)).transpose(1, 2)
        valid_gks = mask_gs.gather(1, order_gs)[:, None, :].expand(-1, k, -1)
        onehot_gtn = torch.nn.functional.one_hot(expert_gks.reshape(g, k * s), n) * valid_gks.reshape(g, k * s, 1)
        position_gks = ((onehot_gtn.cumsum(dim=1) - 1) * onehot_gtn).sum(dim=-1).view(g, k, s)
        kept_gks = valid_gks & (position_gks < cap)

        # Buffer (g, n*c) of flat token indices; unfilled positions point at token 0 with zero weight.
        token_gks = (order_gs + torch.arange(g, device=x.device)[:, None] * s)[:, None, :].expand(-1, k, -1)
        slot_gks = torch.where(kept_gks, expert_gks * cap + position_gks, n * cap)  # n*cap = a discard bin
        token_gb = torch.zeros(g, n * cap + 1, dtype=torch.long, device=x.device)
        token_gb.scatter_(1, slot_gks.reshape(g, -1), token_gks.reshape(g, -1))
        weight_gb = torch.zeros(g, n * cap + 1, dtype=gates_gsn.dtype, device=x.device)
        gate_gks = top_gate_gsk.gather(1, order_gs[..., None].expand(-1, -1, k)).transpose(1, 2)
        weight_gb.scatter_(1, slot_gks.reshape(g, -1), torch.where(kept_gks, gate_gks, 0.0).reshape(g, -1))

        y_to = self._run_experts(x_gsd, token_gb[:, :-1].view(g, n, cap), weight_gb[:, :-1].view(g, n, cap))
        aux, importance, load = self._aux_loss(logits_gsn, noisy_gsn, mask_gs)
        self._record(lambda: self._stats(mask_gs, kept_gks, expert_gks, cap, importance, load), aux)
        return y_to.view(b, m, -1)

    def _priority_order(self, top_gate_gs: torch.Tensor, mask_gs: torch.Tensor) -> torch.Tensor:
        """Token order (g, s): by descending top gate with BPR (padding last), else positional."""
        if not self.batch_priority:
            return torch.arange(top_gate_gs.shape[1], device=top_gate_gs.device).expand_as(top_gate_gs)
        score_gs = torch.where(mask_gs, top_gate_gs, -1.0)
        return torch.argsort(score_gs, dim=1, descending=True, stable=True)

    def _aux_loss(
        self, logits_gsn: torch.Tensor, noisy_gsn: torch.Tensor, mask_gs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted V-MoE auxiliary loss, and its importance and load terms.

        The importance term uses the clean gates `softmax(logits)` (vmoe computes it before adding noise).
        """
        real_gs1 = mask_gs[..., None].to(logits_gsn.dtype)
        importance = cv_squared((torch.softmax(logits_gsn, dim=-1) * real_gs1).sum(dim=1))
        if self.training and self.noise_std > 0:
            load = self._load_loss(logits_gsn, noisy_gsn, real_gs1)
        else:
            load = importance.new_zeros(())
        return self.importance_loss_weight * importance + self.load_loss_weight * load, importance, load

    def _load_loss(self, logits_gsn: torch.Tensor, noisy_gsn: torch.Tensor, real_gs1: torch.Tensor) -> torch.Tensor:
        """vmoe `_load_auxiliary_loss`: P(expert e in top-k) = 1 - Phi((threshold - clean logit) / sigma)."""
        sigma = self.noise_std / self.num_experts
        threshold_gs1 = noisy_gsn.topk(self.top_k, dim=-1).values[..., -1:]
        p_gsn = 1.0 - torch.special.ndtr((threshold_gs1 - logits_gsn) / sigma)
        p_mean_gn = (p_gsn * real_gs1).sum(dim=1) / real_gs1.sum(dim=1).clamp(min=1)
        return cv_squared(p_mean_gn)

    def _stats(self, mask_gs: torch.Tensor, kept_gks: torch.Tensor, expert_gks: torch.Tensor, cap: int,
               importance: torch.Tensor, load: torch.Tensor) -> dict[str, torch.Tensor]:
        """Dropped fraction (real tokens no expert kept), kept assignments, buffer fill and the aux loss terms."""
        num_real = mask_gs.sum().clamp(min=1)
        # kept_gks is in priority order, like mask_gs reordered; a token is processed if any choice is kept.
        processed = kept_gks.any(dim=1).sum()
        per_expert_n = torch.zeros(self.num_experts, device=mask_gs.device).index_add_(
            0, expert_gks.reshape(-1), kept_gks.reshape(-1).float())
        return {
            "dropped_fraction": 1.0 - processed / num_real,
            "assignments_kept_fraction": kept_gks.sum() / (num_real * self.top_k),
            "expert_load_max": per_expert_n.max() / (cap * mask_gs.shape[0]),  # fullest buffer, fraction
            "expert_load_cv": cv_squared(per_expert_n).sqrt(),
            "importance_loss": importance,
            "load_loss": load,
        }


class ExpertsChoiceMoE(SparseMoEBase):
    """Experts Choice routing: each expert takes its top-C tokens of the group, weighted by their gates.

    Args:
        num_experts: Number of experts n.
        capacity_factor: C = round(s * capacity_factor / n) tokens per expert and group of s (n * C ~ cf * s).
        capacity_ceil_or_round, capacity_multiple_of: Rounding of C; the default ("round", 1) is the Soft MoE
            paper's Experts Choice config (vmoe's dispatcher defaults would be ("ceil", 4)).
        routing: "example" (group = one example) or "batch" (group = the whole batch).
        noise_std: Logit noise N(0, (noise_std / n)^2) in training (vmoe's config: 1.0).
        expert_init: "vmoe" or "independent" (see `mmsoftmoe.layers.experts`).
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
        capacity_ceil_or_round: str = "round",
        capacity_multiple_of: int = 1,
        routing: str = "example",
        noise_std: float = 1.0,
        expert_init: str = "vmoe",
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, hidden_features, out_features, act_layer, bias, drop,
                         num_experts=num_experts, capacity_factor=capacity_factor,
                         capacity_ceil_or_round=capacity_ceil_or_round, capacity_multiple_of=capacity_multiple_of,
                         routing=routing, noise_std=noise_std, expert_init=expert_init, norm_layer=norm_layer,
                         device=device, dtype=dtype)

    def capacity(self, group_size: int) -> int:
        """Tokens each expert takes per routing group: vmoe's capacity, at most the group's tokens."""
        return min(group_size, super().capacity(group_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input(x, mask)
        b, m, _ = x.shape
        x_gsd, mask_gs = self._group(x, mask)
        g, s, _ = x_gsd.shape
        _, noisy_gsn = self._logits(x_gsd)
        gates_gsn = torch.softmax(noisy_gsn, dim=-1)
        # Padding scores -1 so it is chosen only when an expert has more capacity than real tokens.
        score_gns = torch.where(mask_gs[..., None], gates_gsn, -1.0).transpose(1, 2)
        gate_gnc, token_gnc = score_gns.topk(self.capacity(s), dim=-1)
        weight_gnc = gate_gnc.clamp(min=0.0)
        token_gnc = token_gnc + torch.arange(g, device=x.device)[:, None, None] * s
        y_to = self._run_experts(x_gsd, token_gnc, weight_gnc)
        self._record(lambda: self._stats(token_gnc, weight_gnc, mask_gs))
        return y_to.view(b, m, -1)

    def _stats(self, token_gnc: torch.Tensor, weight_gnc: torch.Tensor, mask_gs: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """Fraction of real tokens at least one expert took (vmoe `ratio_processed_items_by_at_least_1_experts`),
        its complement, and the most experts any token got."""
        experts_per_token_t = torch.zeros(mask_gs.numel(), device=mask_gs.device).index_add_(
            0, token_gnc.reshape(-1), (weight_gnc > 0).reshape(-1).float())
        processed = ((experts_per_token_t > 0) & mask_gs.reshape(-1)).sum() / mask_gs.sum().clamp(min=1)
        return {
            "processed_fraction": processed,
            "dropped_fraction": 1.0 - processed,
            "experts_per_token_max": experts_per_token_t.max(),
        }
