"""What the model card reports about an image encoder: parameter counts and counted FLOPs per image.

Soft MoE has no per-image sparsity: every expert processes its slots of every image, so the parameters used per
image are all of them. What Soft MoE saves is compute: an MoE layer's n experts process n * p slots instead of the
m tokens a dense MLP processes. "FLOP-equivalent active parameters" counts each Soft MoE layer's expert
parameters times p / m (the slots per expert over the tokens per image): a dense ViT of that many parameters
spends about as many matmul FLOPs per image. FLOPs are counted, not estimated: `FlopCounterMode` over one
forward at batch 1 (2 FLOPs per multiply-add; matmuls, convolutions and attention; elementwise ops excluded).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmsoftmoe.layers import DenseMLP, SoftMoE, routed_layers


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(encoder: nn.Module, trunk: nn.Module) -> dict[str, int | None]:
    """Total, used-per-image and FLOP-equivalent active parameters (None for sparse-routed towers)."""
    total = count_parameters(encoder)
    layers = routed_layers(trunk).values()
    soft = [layer for layer in layers if isinstance(layer, SoftMoE)]
    expert = sum(count_parameters(layer.experts) for layer in soft)
    if any(not isinstance(layer, (SoftMoE, DenseMLP)) for layer in layers):
        return {"total": total, "expert": expert, "used_per_image": None, "flop_equivalent_active": None}
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    share = sum(count_parameters(layer.experts) * layer.slots_per_expert / tokens for layer in soft)
    return {"total": total, "expert": expert, "used_per_image": total,
            "flop_equivalent_active": round(total - expert + share)}


@torch.no_grad()
def count_flops(encoder: nn.Module, image_size: tuple[int, int]) -> int:
    """Forward FLOPs of one image, counted by `FlopCounterMode`."""
    # The math SDPA backend runs attention as matmuls, which the counter sees; CPU flash attention it does not.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        encoder.eval()(torch.zeros(1, 3, *image_size, device=next(encoder.parameters()).device))
    return counter.get_total_flops()
