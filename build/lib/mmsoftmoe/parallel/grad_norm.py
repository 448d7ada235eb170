"""Gradient clipping by the global norm over parameters that live on different device meshes.

torchtitan `distributed/utils.py` (`clip_grad_norm_`, `_clip_grad_norm_with_ep`): torch's `clip_grad_norm_`
stacks the per-tensor norms, which fails for DTensors of different meshes (dense parameters on the data-parallel
mesh, experts on the expert mesh). The norms are reduced per mesh, made full (`full_tensor` sums the shards'
partial norms and does not count replicas twice), then combined across meshes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch.distributed.tensor import DTensor


def _by_mesh(tensors: list[torch.Tensor], key: Callable[[torch.Tensor], torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` grouped by the device mesh of `key(tensor)` when a DTensor (plain tensors form one group)."""
    groups: dict[object, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(key(t).device_mesh if isinstance(key(t), DTensor) else None, []).append(t)
    return list(groups.values())


def global_grad_norm(grads: list[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The `norm_type` norm of all `grads` together, whatever mesh each one is on (a plain 0-d tensor)."""
    norms = []
    for group in _by_mesh(grads, lambda g: g):
        norm = torch.nn.utils.get_total_norm(group, norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if math.isinf(norm_type):
        return torch.stack(norms).max()
    return torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale the gradients in place so their global norm is at most `max_norm`; return the norm before."""
    params = [p for p in parameters if p.grad is not None]
    total = global_grad_norm([p.grad for p in params], norm_type)
    for group in _by_mesh(params, lambda p: p.grad):  # one multi-tensor scaling per mesh (foreach ops take one mesh)
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
