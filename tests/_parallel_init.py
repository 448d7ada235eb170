"""Worker of tests/test_parallel_init.py (run under torchrun): build each model sharded over each layout on the
meta device, draw it with `init_sharded_`, and write the gathered weights to OUT (safetensors) from rank 0.

Usage: python -m torch.distributed.run --nproc_per_node N tests/_parallel_init.py OUT LAYOUT... (LAYOUT "r,s,ep")
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmsoftmoe.models.clip import build_clip_from_config, resolve_clip_config
from mmsoftmoe.parallel import build_meshes, expert_layers, full_model_state_dict, init_sharded_, parallelize

MODELS = ("SoftMoE-Micro-4-32-Sigmoid", "TokensChoiceK1-Micro-4-32")
SEED = 7


def sharded_weights(name: str, layout: str) -> dict[str, torch.Tensor]:
    """The weights of `name` initialised under `layout` on this process group, gathered (on rank 0)."""
    dp_replicate, dp_shard, ep = (int(v) for v in layout.split(","))
    model, _ = build_clip_from_config(resolve_clip_config(name), device="meta")
    assert expert_layers(model), name
    parallelize(model, build_meshes(device_type="cpu", dp_replicate=dp_replicate, dp_shard=dp_shard, ep=ep))
    init_sharded_(model, seed=SEED, device="cpu")
    weights = {k: v.clone() for k, v in full_model_state_dict(model).items()}
    weights["attn_mask"] = model.attn_mask.clone()
    return weights


def main(out_path: str, layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    results = {f"{name}/{layout}/{k}": v for name in MODELS for layout in layouts
               for k, v in sharded_weights(name, layout).items()}
    if dist.get_rank() == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
