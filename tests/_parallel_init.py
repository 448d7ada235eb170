"""A model built on the meta device, parallelized, then filled from rank 0; run under `torchrun`.

`... tests/_parallel_init.py OUT LAYOUT`: rank 0 saves the full weights and buffers of the materialized model
(`init/...`) and the results of one training step from them (`step0/...`, as `run_steps` records them), so
tests/test_parallel.py can compare with a model built as usual and trained in one process.
"""

import sys

import torch.distributed as dist
from safetensors.torch import save_file

from mmsoftmoe.models.clip import build_clip_from_config, resolve_clip_config
from mmsoftmoe.parallel import build_meshes, clip_grad_norm_, full_model_state_dict, parallelize
from mmsoftmoe.parallel.materialize import materialize_from_rank0
from tests._parallel_checkpoint import MODEL
from tests._parallel_train import make_model, run_steps


def main(out: str, layout: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_replicate, dp_shard, ep = (int(v) for v in layout.split(","))
    model, tokenizer = build_clip_from_config(resolve_clip_config(MODEL), device="meta")
    parallelize(model, build_meshes(device_type="cpu", dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep))
    materialize_from_rank0(model, make_model(MODEL)[0] if rank == 0 else None, "cpu")
    results = {f"init/{k}": v.clone() for k, v in full_model_state_dict(model).items()}
    results.update({f"init/buffer/{name}": b.detach().clone() for name, b in model.named_buffers()})
    results.update(run_steps(model, tokenizer, rank, world, clip_grad_norm_, steps=range(1)))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items() if not k.startswith("weight/")}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
