"""Routing statistics and auxiliary losses shared by every token-mixing MLP layer.

Every layer in `mmsoftmoe.layers` records, on each forward, a dict of scalar statistics (detached, on the
layer's device: no host sync in the hot path) and an auxiliary loss (a tensor with grad, zero for layers
that have none). A training loop reads them through `collect_routing_stats` and `collect_aux_loss` without
knowing the layer types (torchtitan keeps such statistics in the layer for the same reason).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class RoutingStatsMixin:
    """Holds the statistics and auxiliary loss of the last forward pass.

    `record_stats` (default True) can be switched off per layer, or for a whole model with `set_record_stats`,
    to skip computing the statistics on forwards nobody logs (about a tenth of a Soft MoE S/16 layer's forward
    time on CPU). The auxiliary loss is part of the objective and is always recorded.
    """

    last_stats: dict[str, torch.Tensor]
    aux_loss: torch.Tensor | None
    record_stats: bool
    routes_across_examples = False  # True when an example's output depends on the rest of the batch

    def _init_routing_stats(self) -> None:
        self.last_stats = {}
        self.aux_loss = None
        self.record_stats = True

    def _record(self, stats_fn: Callable[[], dict[str, torch.Tensor]], aux_loss: torch.Tensor | None = None) -> None:
        if torch.compiler.is_exporting():  # an exported graph has no Python attributes to write to
            return
        self.aux_loss = aux_loss
        if self.record_stats:
            with torch.no_grad():
                self.last_stats = {k: v.detach() for k, v in stats_fn().items()}


def set_record_stats(model: nn.Module, enabled: bool) -> None:
    """Switch the routing statistics of every routed layer in `model` on or off."""
    for layer in routed_layers(model).values():
        layer.record_stats = enabled


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All submodules of `model` that record routing statistics, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutingStatsMixin)}


def collect_routing_stats(model: nn.Module, prefix: str = "router") -> dict[str, float]:
    """Flat `{f"{prefix}/{layer}/{stat}": value}` of the last forward, ready for a logger.

    This reads device tensors back to the host: call it at logging steps only.
    """
    out: dict[str, float] = {}
    for name, layer in routed_layers(model).items():
        for key, value in layer.last_stats.items():
            out[f"{prefix}/{name}/{key}"] = float(value)
    return out


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the auxiliary losses of the last forward (already weighted by each layer), or None if none."""
    losses = [m.aux_loss for m in routed_layers(model).values() if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None
