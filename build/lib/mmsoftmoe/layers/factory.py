"""Name -> layer class for the MLP layers a model config can ask for."""

from __future__ import annotations

from torch import nn

from mmsoftmoe.layers.dense import DenseMLP
from mmsoftmoe.layers.soft_moe import SoftMoE
from mmsoftmoe.layers.sparse_moe import ExpertsChoiceMoE, TokensChoiceMoE

MOE_LAYERS: dict[str, type[nn.Module]] = {
    "soft": SoftMoE,
    "tokens_choice": TokensChoiceMoE,
    "experts_choice": ExpertsChoiceMoE,
    "dense": DenseMLP,
}


def get_moe_layer(name: str) -> type[nn.Module]:
    """The layer class registered as `name`; a ValueError lists the valid names."""
    if name not in MOE_LAYERS:
        raise ValueError(f"unknown moe layer {name!r}; valid choices: {sorted(MOE_LAYERS)}")
    return MOE_LAYERS[name]
