"""Token-mixing MLP layers: Soft MoE, the sparse baselines (Tokens Choice, Experts Choice) and dense."""

from mmsoftmoe.layers.dense import DenseMLP
from mmsoftmoe.layers.experts import StackedExperts
from mmsoftmoe.layers.factory import MOE_LAYERS, get_moe_layer
from mmsoftmoe.layers.routing_stats import (
    RoutingStatsMixin,
    collect_aux_loss,
    collect_routing_stats,
    routed_layers,
    set_record_stats,
)
from mmsoftmoe.layers.soft_moe import SoftMoE, l2_normalize
from mmsoftmoe.layers.sparse_moe import ExpertsChoiceMoE, TokensChoiceMoE

__all__ = [
    "MOE_LAYERS",
    "DenseMLP",
    "ExpertsChoiceMoE",
    "RoutingStatsMixin",
    "SoftMoE",
    "StackedExperts",
    "TokensChoiceMoE",
    "collect_aux_loss",
    "collect_routing_stats",
    "get_moe_layer",
    "l2_normalize",
    "routed_layers",
    "set_record_stats",
]
