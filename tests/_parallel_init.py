"""A model built on the meta device, parallelized, then filled from rank 0; run under `torchrun`.

`... tests/_parallel_init.py OUT LAYOUT`: rank 0 saves the full weights and buffers of the materialized model,
and each process its peak resident memory, so tests/test_parallel.py can compare with a model built as usual.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmsoftmoe.models.clip import build_clip_from_config, resolve_clip_config
from mmsoftmoe.parallel import build_meshes, full_model_state_dict, parallelize
from mmsoftmoe.parallel.materialize import materialize_from_rank0
from tests._parallel_checkpoint import MODEL


def main(out: str, layout: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dp_replicate, dp_shard, ep = (int(v) for v in layout.split(","))
    model, _ = build_clip_from_config(resolve_clip_config(MODEL), device="meta")
    parallelize(model, build_meshes(device_type="cpu", dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep))
    torch.manual_seed(0)
    full = build_clip_from_config(resolve_clip_config(MODEL))[0] if rank == 0 else None
    materialize_from_rank0(model, full, "cpu")
    weights = full_model_state_dict(model)
    buffers = {f"buffer/{name}": b.detach().clone() for name, b in model.named_buffers()}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in {**weights, **buffers}.items()}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
