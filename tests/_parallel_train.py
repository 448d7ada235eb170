"""Three optimizer steps of a micro CLIP under a parallel layout; run under `torchrun --nproc_per_node N`.

`python -m torch.distributed.run ... tests/_parallel_train.py OUT LAYOUT [LAYOUT ...]` with LAYOUT
`dp_replicate,dp_shard,ep[,micro_batches]` (gradient accumulation over micro-batches, default 1): rank 0 saves
the global loss, the gradient norm, every full gradient of every step and the trained weights, for each model
of `MODELS` and each layout, to OUT (safetensors). Each sharded model is built as the trainer builds one (meta
device, `parallelize`, `materialize_from_rank0`), so its first step also checks that filling. tests/test_parallel.py
runs the same steps in one process with `run_steps` and compares.
"""

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config, resolve_clip_config
from mmsoftmoe.parallel import (
    build_meshes,
    check_layout,
    clip_grad_norm_,
    expert_layers,
    materialize_from_rank0,
    parallelize,
)
from mmsoftmoe_training.loop import build_loss, train_step
from mmsoftmoe_training.optim import build_optimizer
from tests.training_fixtures import rank_slice, split

MODELS = ("SoftMoE-Micro-4-32", "TokensChoiceK1-Micro-4-32")
STEPS, GLOBAL_BATCH, MAX_NORM = 3, 8, 0.05


def make_model(name: str) -> tuple[torch.nn.Module, Callable]:
    """The model with deterministic routing (logit noise draws differ between layouts, so it is off)."""
    torch.manual_seed(0)
    model, tokenizer = build_clip_from_config(resolve_clip_config(name))
    for layer in expert_layers(model).values():
        layer.noise_std = 0.0
    return model, tokenizer


def batches(model: torch.nn.Module, tokenizer: Callable) -> list[dict]:
    """STEPS global batches of generated image-caption pairs."""
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_config(model))
    data = PairDataset(ShapesCaptions(STEPS * GLOBAL_BATCH, image_size=32, seed=3), transform=eval_tf,
                       tokenizer=tokenizer)
    full = collate([data[i] for i in range(STEPS * GLOBAL_BATCH)])
    return [rank_slice(full, s, STEPS) for s in range(STEPS)]


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(model, lr=1e-3, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)


def run_steps(model: torch.nn.Module, tokenizer: Callable, rank: int, world: int, clip: Callable,
              optimizer: torch.optim.Optimizer | None = None, steps: range = range(STEPS),
              micro_batches: int = 1) -> dict[str, torch.Tensor]:
    """AdamW `steps` on this rank's share of each global batch; the global losses, norms, grads, weights."""
    accelerator = Accelerator(cpu=True)
    optimizer = optimizer or make_optimizer(model)
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    out, global_batches = {}, batches(model, tokenizer)
    for step in steps:
        batch = global_batches[step]
        micro = split(rank_slice(batch, rank, world), micro_batches)
        losses = train_step(model, micro, loss_fn, accelerator, model.visual, 1.0)
        total = sum(losses.values()).reshape(1)
        if world > 1:
            dist.all_reduce(total)
        out[f"step{step}/loss"] = total / world
        for pname, p in model.named_parameters():
            out[f"step{step}/grad/{pname}"] = full(p.grad)
        out[f"step{step}/grad_norm"] = full(clip(model.parameters(), MAX_NORM)).reshape(1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for pname, p in model.named_parameters():
        out[f"weight/{pname}"] = full(p)
    return out


def main(out_path: str, layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name in MODELS:
        for layout in layouts:
            dp_replicate, dp_shard, ep, micro_batches = (int(v) for v in f"{layout},1".split(",")[:4])
            # As the trainer builds a sharded model: on the meta device, parallelized, filled from rank 0's build.
            model, tokenizer = build_clip_from_config(resolve_clip_config(name), device="meta")
            for layer in expert_layers(model).values():
                layer.noise_std = 0.0
            num_experts = tuple(m.num_experts for m in expert_layers(model).values())
            check_layout(world_size=world, dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep,
                         num_experts=num_experts)
            meshes = build_meshes(device_type="cpu", dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep)
            parallelize(model, meshes)
            materialize_from_rank0(model, make_model(name)[0] if rank == 0 else None, "cpu")
            steps = run_steps(model, tokenizer, rank, world, clip_grad_norm_, micro_batches=micro_batches)
            results.update({f"{name}/{layout}/{k}": v for k, v in steps.items()})
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
