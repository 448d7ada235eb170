"""Run under `torchrun --nproc_per_node N`: one training step, losses and averaged gradients saved.

Used by tests/test_training.py to compare N processes against one process on the same global batch.
"""

import sys

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file

from mmsoftmoe_training.loop import build_loss, train_step
from tests.training_fixtures import global_batch, make_model, rank_slice


def main(out_path: str, global_size: int) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    results = {}
    for kind in ("clip", "siglip"):
        set_seed(0)
        model, tokenizer = make_model(kind)
        model = accelerator.prepare(model)
        assert world > 1 and isinstance(model, torch.nn.parallel.DistributedDataParallel)
        batch = rank_slice(global_batch(tokenizer, global_size), rank, world)
        loss_fn = build_loss(kind, local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        losses = train_step(model, [batch], loss_fn, accelerator, model.module.visual, 1.0)
        total = sum(losses.values()).reshape(1)
        results[f"{kind}/loss"] = accelerator.reduce(total, reduction="mean")
        for name, p in model.module.named_parameters():
            results[f"{kind}/grad/{name}"] = p.grad.detach().clone()
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in results.items()}, out_path)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
