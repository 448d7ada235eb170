"""AdamW with the weight-decay exclusions the model declares, and the learning-rate schedules.

No weight decay on 0-d/1-d parameters (norm gains, biases, `logit_scale`, `logit_bias`, Soft MoE's `scale`) as in
open_clip, nor on what the model's modules name in `no_weight_decay()` (Soft MoE's `phi` and expert biases, the
positional embeddings): `mmsoftmoe.models.accounting.no_weight_decay_names`, the rule fine-tuning also follows
through timm's optimizer factory. Schedules are pure functions of the
step, so a resumed run needs no scheduler state:
- cosine: linear warmup, then cosine decay to `min_lr_ratio * lr` (open_clip's default);
- rsqrt: linear warmup, reciprocal square root decay (timescale = warmup, big_vision's `rsqrt`), and a linear
  cooldown to 0 over the last `cooldown_steps` (the paper's JFT recipe: 10k warmup, 50k cooldown);
- constant: linear warmup, then constant.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

from mmsoftmoe.models.accounting import no_weight_decay_names


def build_optimizer(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, in a decayed and a non-decayed group."""
    skip = no_weight_decay_names(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: both towers are locked (model.lock_image and model.lock_text)")
    groups = [
        {"params": [p for n, p in params if n not in skip], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n in skip], "weight_decay": 0.0},
    ]
    # Fused: one kernel per step, and it skips a non-finite step on the device (`found_inf`, see
    # training.loop.step_unless_nonfinite). Where the parameters' device has no fused kernel, torch's default.
    fused = all(p.device.type in _get_fused_kernels_supported_devices() and p.dtype.is_floating_point
                for _, p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=fused)


def lr_multiplier(step: int, *, schedule: str, total_steps: int, warmup_steps: int, cooldown_steps: int = 0,
                  min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    mult = 1.0
    if schedule == "rsqrt":
        mult = math.sqrt(max(1, warmup_steps) / max(step, warmup_steps, 1))
    if cooldown_steps and step >= total_steps - cooldown_steps:
        mult *= (total_steps - step) / cooldown_steps
    return mult


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
