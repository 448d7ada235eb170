"""What a model's parameters are and cost: weight-decay treatment, parameter counts, counted FLOPs.

One place for every caller (training's optimizer, fine-tuning through timm's optimizer factory, the export's model
card, the benchmarks), and it knows no layer type: layers and towers declare what it needs (see
`mmsoftmoe.layers.base`).

- Weight decay: none on 0-d/1-d parameters (norm gains, biases, `logit_scale`/`logit_bias`, Soft MoE's `scale`;
  open_clip's and timm's rule), nor on any parameter a module names in its `no_weight_decay()` (timm's protocol:
  `pos_embed`, open_clip's `positional_embedding`, Soft MoE's `phi`, the (n, 1, h) expert biases). vmoe decays
  `.*/kernel` only (`configs/common.py`, `pretrain_laion.py`), which these rules match for the image tower.
- Parameters (`parameter_counts`): Soft MoE has no per-image sparsity: every expert processes its slots of every
  image, so the parameters used per image are all of them. What Soft MoE saves is compute: an MoE layer's n experts
  process n * p rows instead of the m tokens a dense MLP processes. "FLOP-equivalent active parameters" counts each
  MoE layer's expert parameters times (rows per expert) / m: a dense ViT of that many parameters spends about as
  many matmul FLOPs per image.
- FLOPs are counted, not estimated: `FlopCounterMode` over a call (2 FLOPs per multiply-add; matmuls, convolutions
  and attention, elementwise ops excluded). The layers' own `flops_per_example` formulas are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mmsoftmoe.layers import routed_layers


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of `model`'s parameters that get no weight decay (see the module docstring)."""
    params = dict(model.named_parameters())
    names = {name for name, p in params.items() if p.ndim < 2}
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{name}" if prefix else name for name in declared()}
    return names & params.keys()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(encoder: nn.Module, trunk: nn.Module) -> dict[str, int | None]:
    """Total, expert, used-per-image (None with sparse routing) and FLOP-equivalent active parameters."""
    layers = list(routed_layers(trunk).values())
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    total = count_parameters(encoder)
    moe = [layer for layer in layers if hasattr(layer, "experts")]
    expert = sum(count_parameters(layer.experts) for layer in moe)
    share = sum(count_parameters(layer.experts) * layer.expert_rows_per_example(tokens) / tokens for layer in moe)
    used = total if all(layer.uses_all_parameters for layer in layers) else None
    return {"total": total, "expert": expert, "used_per_image": used,
            "flop_equivalent_active": round(total - expert + share)}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of `fn()`, counted by `FlopCounterMode` (what the model card, the benchmarks and the study report)."""
    # The math SDPA backend runs attention as matmuls, which the counter sees; CPU flash attention it does not.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def image_flops(encoder: nn.Module, image_size: tuple[int, int]) -> int:
    """Forward FLOPs of one image through `encoder` in eval mode."""
    device = next(encoder.parameters()).device
    return count_flops(lambda: encoder.eval()(torch.zeros(1, 3, *image_size, device=device)))
