"""Mixture-of-experts Vision Transformers on top of timm's `VisionTransformer`.

Puigcerver et al. 2024 (section 3 and vmoe `configs/common.py`) replace the MLP of the **last half** of the
blocks by a Soft MoE layer, keep everything else of the ViT, and pool by global average. `MoEVisionTransformer`
does exactly that for any layer of `mmsoftmoe.layers.MOE_LAYERS`, so every timm feature that does not depend
on the MLP keeps working: `forward_features`, `forward_head`, `forward_intermediates`, `reset_classifier`,
`set_grad_checkpointing`, the pooling choices (`avg`, `token`, `map`, ...), `no_weight_decay`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from timm.layers import get_act_layer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mmsoftmoe.layers import get_moe_layer, routed_layers

MOE_BLOCK_CHOICES = ("last_half", "all", "none", "every_2")


def resolve_moe_blocks(moe_blocks: str | Sequence[int], depth: int) -> tuple[int, ...]:
    """Block indices whose MLP becomes an MoE layer: a named pattern or explicit (negative-ok) indices."""
    if isinstance(moe_blocks, str):
        patterns = {
            "last_half": range(depth // 2, depth),
            "all": range(depth),
            "none": range(0),
            "every_2": range(1, depth, 2),  # V-MoE's "every other block"
        }
        if moe_blocks not in patterns:
            raise ValueError(f"moe_blocks must be one of {MOE_BLOCK_CHOICES} or a list of block indices, "
                             f"got {moe_blocks!r}")
        return tuple(patterns[moe_blocks])
    indices = sorted({int(i) % depth if -depth <= int(i) < depth else int(i) for i in moe_blocks})
    bad = [i for i in indices if not 0 <= i < depth]
    if bad:
        raise ValueError(f"moe_blocks indices {bad} out of range for depth={depth}")
    return tuple(indices)


_SET_BY_MODEL = ("in_features", "hidden_features", "out_features", "act_layer", "bias", "drop", "num_tokens",
                 "norm_layer", "device", "dtype")


def layer_arguments(layer_cls: type[nn.Module]) -> set[str]:
    """Keyword arguments `layer_cls` takes."""
    return set(inspect.signature(layer_cls.__init__).parameters) - {"self"}


def check_layer_kwargs(layer_cls: type[nn.Module], moe_kwargs: dict) -> None:
    """Reject `moe_kwargs` keys that `layer_cls` does not take, or that the model sets itself."""
    valid = sorted(layer_arguments(layer_cls) - set(_SET_BY_MODEL))
    bad = sorted(k for k in moe_kwargs if k not in valid)
    if bad:
        raise ValueError(f"moe_kwargs {bad} not accepted by {layer_cls.__name__}; valid keys: {valid}")


class MoEVisionTransformer(VisionTransformer):
    """timm `VisionTransformer` whose chosen blocks use a mixture-of-experts MLP.

    Args:
        moe_layer: Name of the MLP layer of the MoE blocks: "soft", "tokens_choice", "experts_choice", "dense".
        moe_blocks: Which blocks get it: "last_half" (the paper), "all", "every_2", "none", or indices.
        moe_kwargs: Arguments of that layer (e.g. `num_experts`, `slots_per_expert`, `top_k`).
        **kwargs: timm `VisionTransformer` arguments.
    """

    def __init__(
        self,
        *,
        moe_layer: str = "soft",
        moe_blocks: str | Sequence[int] = "last_half",
        moe_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        layer_cls = get_moe_layer(moe_layer)
        check_layer_kwargs(layer_cls, moe_kwargs or {})  # fail before building the ViT
        super().__init__(**kwargs)
        self.moe_layer = moe_layer
        self.moe_block_indices = resolve_moe_blocks(moe_blocks, len(self.blocks))
        model_args = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        if "num_tokens" in layer_arguments(layer_cls):  # layers sized by the tokens per image (Soft MoE slots)
            model_args["num_tokens"] = self.patch_embed.num_patches + self.num_prefix_tokens
        act_layer = get_act_layer(kwargs.get("act_layer")) or nn.GELU
        for i in self.moe_block_indices:
            dense = self.blocks[i].mlp
            self.blocks[i].mlp = layer_cls(
                in_features=self.embed_dim,
                hidden_features=dense.fc1.out_features,
                act_layer=act_layer,
                bias=dense.fc1.bias is not None,
                drop=kwargs.get("proj_drop_rate", 0.0),
                **(moe_kwargs or {}),
                **model_args,
            )

    def no_weight_decay(self) -> set[str]:
        """timm's (`pos_embed`, class/register tokens) and every MoE layer's own (`phi`, expert biases), by full name:
        timm's optimizer factory reads this, and `mmsoftmoe.models.accounting.no_weight_decay_names` reads the same
        layer declarations."""
        layers = {f"{name}.{param}" for name, layer in routed_layers(self).items() for param in layer.no_weight_decay()}
        return super().no_weight_decay() | layers

    def routing_stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per MoE block, the routing statistics of the last forward (detached tensors)."""
        return {name: layer.last_stats for name, layer in routed_layers(self).items()}
