"""Materialize a parallelized meta-device model where every process draws only the weights it holds.

torchtitan's start-up (`model.to_empty(device=...)`, then `init_weights()` on each rank's shards), made
independent of the layout by `mmsoftmoe.models.init`: every parameter, and every expert of a stacked one, draws
from a generator seeded by (seed, name[, expert]), so each process fills its FSDP2 rows and its experts with
exactly the values a one-process build holds there. No process ever holds more than its shards plus one whole
parameter (an unstacked parameter is drawn whole, then sliced; experts one at a time). No communication.
"""

from __future__ import annotations

import torch
from torch import nn

from mmsoftmoe.models.init import init_weights_


def _causal_mask(size: int) -> torch.Tensor:
    """open_clip's text attention mask (`TextTransformer.build_causal_mask`): -inf above the diagonal."""
    return torch.full((size, size), float("-inf")).triu_(1)


# The buffers a meta build leaves without values, by name -> their value (given the buffer's shape and dtype):
# open_clip's causal mask, and the non-persistent ids of Hugging Face BERT-style embeddings (transformers'
# `BertEmbeddings`: `position_ids = arange(max_position_embeddings).expand((1, -1))`, `token_type_ids` zeros).
BUFFER_VALUES = {
    "attn_mask": lambda shape, dtype: _causal_mask(shape[-1]).to(dtype),
    "position_ids": lambda shape, dtype: torch.arange(shape[-1], dtype=dtype).expand(shape),
    "token_type_ids": lambda shape, dtype: torch.zeros(shape, dtype=dtype),
}


@torch.no_grad()
def init_buffers_(model: nn.Module) -> None:
    """Fill the buffers a meta build leaves without values (`BUFFER_VALUES`); any other is a ValueError."""
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in BUFFER_VALUES:
                raise ValueError(f"buffer {module_name}.{name} has no known starting value; build the model "
                                 "unsharded and fill it with mmsoftmoe.parallel.materialize_from_rank0")
            buffer.copy_(BUFFER_VALUES[name](tuple(buffer.shape), buffer.dtype))


def init_sharded_(model: nn.Module, seed: int, device: torch.device | str) -> nn.Module:
    """Allocate the shards of `model` (built on the meta device, then `parallelize`d) on `device` and draw them.

    Args:
        model: A CLIP model built by `mmsoftmoe.models.clip.build_clip_from_config(..., device="meta")`.
        seed: The run's seed: the values equal those of a one-process build after `torch.manual_seed(seed)`.
        device: This process's device.
    """
    model.to_empty(device=device)
    init_weights_(model, seed)
    init_buffers_(model)
    return model
