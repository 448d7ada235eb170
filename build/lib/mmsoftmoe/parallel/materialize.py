"""Build a parallelized model without every process holding all of it: on the meta device, then filled from one.

torchtitan builds its models on the meta device, parallelizes them, then allocates only each process's shards
(`to_empty`); torchtune fills such a model from one full state dict broadcast by rank 0
(`set_model_state_dict(..., broadcast_from_rank0=True)`). Done here with a full model that rank 0 builds as
usual, the sharded model starts from exactly the weights a one-process run starts from, and only rank 0's host
memory ever holds the whole model (instead of every process's).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict


def materialize_from_rank0(model: nn.Module, full: nn.Module | None, device: torch.device | str) -> None:
    """Allocate the shards of `model` (built on the meta device, then parallelized) on `device` and fill them
    with the weights of `full`, an unsharded model that rank 0 passes (the other ranks pass None)."""
    if (dist.get_rank() == 0) != (full is not None):
        raise ValueError("materialize_from_rank0: pass the full model on rank 0 and None on every other rank")
    model.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full.state_dict() if full is not None else {}, options=options)
    # Buffers outside the state dict (open_clip's causal attention mask) come from rank 0 too.
    saved = set(model.state_dict())
    full_buffers = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():
        if name not in saved:
            if full is not None:
                buffer.copy_(full_buffers[name])
            dist.broadcast(buffer, src=0)
