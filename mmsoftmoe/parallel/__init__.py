"""Scale-out of mmsoftmoe models on torch's distributed engine: device meshes, expert parallelism, FSDP2.

The layers stay unaware of distribution (torchtitan's design): `parallelize(model, build_meshes(...))` rewrites
a built model in place, `clip_grad_norm_` clips by the global norm over parameters on different meshes, and
`save_sharded` / `load_sharded` / `consolidate` are its checkpoints (DCP, resharded at load), which
`load_sharded_clip` reads sharded over every process (evaluation under torchrun) and `read_sharded_model` whole in
one; `init_sharded_` materializes a model built on the meta device and parallelized, each process drawing only the
weights it holds (the values of a one-process build), and `materialize_from_rank0` fills one from rank 0's full
model instead (for weights read from a whole file: warm starts, upcycling).
"""

from mmsoftmoe.parallel.dcp import (
    SHARDED_DIR,
    consolidate,
    full_model_state_dict,
    is_sharded_checkpoint,
    load_sharded,
    load_sharded_clip,
    load_whole_clip,
    read_sharded_model,
    save_sharded,
    save_sharded_async,
)
from mmsoftmoe.parallel.expert_parallel import apply_expert_parallel
from mmsoftmoe.parallel.grad_norm import clip_grad_norm_
from mmsoftmoe.parallel.init import init_sharded_
from mmsoftmoe.parallel.materialize import materialize_from_rank0
from mmsoftmoe.parallel.mesh import ParallelMeshes, build_meshes, check_layout
from mmsoftmoe.parallel.parallelize import expert_layers, parallelize, unsharded_root

__all__ = [
    "SHARDED_DIR",
    "ParallelMeshes",
    "apply_expert_parallel",
    "build_meshes",
    "check_layout",
    "clip_grad_norm_",
    "consolidate",
    "expert_layers",
    "full_model_state_dict",
    "init_sharded_",
    "is_sharded_checkpoint",
    "load_sharded",
    "load_sharded_clip",
    "load_whole_clip",
    "materialize_from_rank0",
    "parallelize",
    "read_sharded_model",
    "save_sharded",
    "save_sharded_async",
    "unsharded_root",
]
