"""Sharded checkpoints across layouts; run under `torchrun --nproc_per_node N`.

`... tests/_parallel_checkpoint.py DIR save LAYOUT`: two steps, a checkpoint folder DIR/ckpt (the DCP state in
`sharded/`, `open_clip_config.json` and `manifest.json`, as the trainer writes it), the full weights then in
DIR/saved.safetensors, then the third step's results in DIR/continued.safetensors.
`... DIR resume LAYOUT`: a fresh model and optimizer under LAYOUT restored from DIR/ckpt, then the third step's
results in DIR/resumed_<N>.safetensors. tests/test_parallel.py compares them (and a one-process resume).
"""

import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

from mmsoftmoe.checkpoint import write_manifest
from mmsoftmoe.models.clip import resolve_clip_config, write_clip_config
from mmsoftmoe.parallel import build_meshes, parallelize
from mmsoftmoe.parallel.dcp import SHARDED_DIR, full_model_state_dict, load_sharded, save_sharded
from mmsoftmoe.parallel.grad_norm import clip_grad_norm_
from tests._parallel_train import make_model, make_optimizer, run_steps

MODEL = "SoftMoE-Micro-4-32"


def main(folder: Path, mode: str, layout: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_replicate, dp_shard, ep = (int(v) for v in layout.split(","))
    model, tokenizer = make_model(MODEL)
    parallelize(model, build_meshes(device_type="cpu", dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep))
    optimizer = make_optimizer(model)
    if mode == "save":
        run_steps(model, tokenizer, rank, world, clip_grad_norm_, optimizer, steps=range(2))
        save_sharded(folder / "ckpt" / SHARDED_DIR, model, optimizer)
        weights = full_model_state_dict(model)
        if rank == 0:
            write_clip_config(model, resolve_clip_config(MODEL), folder / "ckpt")
            write_manifest(folder / "ckpt")  # as the trainer does: what `mmsoftmoe consolidate` verifies
            save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "saved.safetensors"))
        name = "continued.safetensors"
    else:
        load_sharded(folder / "ckpt" / SHARDED_DIR, model, optimizer)
        name = f"resumed_{world}.safetensors"
    third = run_steps(model, tokenizer, rank, world, clip_grad_norm_, optimizer, steps=range(2, 3))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in third.items()}, str(folder / name))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
