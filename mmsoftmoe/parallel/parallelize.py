"""Apply expert parallelism and FSDP2 to a CLIP model from outside its layers (torchtitan's `parallelize_*`).

torchtitan `models/*/infra/parallelize.py` (`apply_moe_ep_tp`, `apply_fsdp`): first the experts of every MoE
layer are split over the `ep` mesh (`expert_parallel.py`) and wrapped by FSDP2 over the expert data-parallel
mesh; then every transformer block and finally the root are wrapped by FSDP2 over the dense mesh
(HSDP when `dp_replicate > 1`). FSDP2 skips parameters an inner `fully_shard` already owns, so the two
parameter kinds end up on their own meshes.

FSDP2 refuses 0-d parameters (`logit_scale`, `logit_bias`, Soft MoE's `scale`); they stay whole on every rank,
outside FSDP2, and a gradient hook averages them over all ranks as soon as they are accumulated.

Gradients: FSDP2 averages over its mesh, but an expert's gradient already holds the sum over its `ep` ranks
(the all-to-all's backward brings every rank's slots' gradients to the expert's owner). Dividing the expert
gradients by the whole data-parallel size instead of the expert-FSDP size (torchtitan's
`fsdp_gradient_divide_factor`) makes both kinds the gradient of the mean loss over the global batch.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator

import open_clip.transformer
import timm.models.vision_transformer
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from mmsoftmoe.layers.base import ExpertLayerBase
from mmsoftmoe.parallel.expert_parallel import apply_expert_parallel
from mmsoftmoe.parallel.mesh import ParallelMeshes

# The units FSDP2 gathers one at a time: timm's ViT block (mmsoftmoe's towers) and open_clip's text block.
BLOCK_TYPES: tuple[type[nn.Module], ...] = (
    timm.models.vision_transformer.Block,
    open_clip.transformer.ResidualAttentionBlock,
)


def expert_layers(model: nn.Module) -> dict[str, ExpertLayerBase]:
    """Every layer of `model` that holds stacked experts, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLayerBase)}


def _fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """A (replicate, shard) mesh as FSDP2 takes it: 2-D for HSDP, its shard dimension alone otherwise."""
    return mesh if mesh.size(0) > 1 else mesh[mesh.mesh_dim_names[1]]


def _average_scalar_grads(model: nn.Module, mesh: DeviceMesh) -> None:
    """Average the gradient of every trainable 0-d parameter over `mesh` once backward has accumulated it.

    The gradient hooks are (re)attached before each forward, because `to_empty` (materializing a meta-device
    model) replaces parameter objects and drops their hooks.
    """
    group, size = mesh.get_group(), mesh.size()
    hooked: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()

    def average(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad, group=group)
        p.grad.div_(size)

    def attach(module: nn.Module, args: tuple) -> None:
        for p in module.parameters():
            if p.ndim == 0 and p.requires_grad and p not in hooked:
                p.register_post_accumulate_grad_hook(average)
                hooked.add(p)

    model.register_forward_pre_hook(attach)


def mixed_precision_policy(param_dtype: torch.dtype | None) -> MixedPrecisionPolicy:
    """FSDP2's policy for a compute dtype: parameters all-gathered in `param_dtype`, gradients reduced in float32,
    master weights (and so the optimizer state and checkpoints) float32; None: everything float32."""
    if param_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def parallelize(model: nn.Module, meshes: ParallelMeshes, *, param_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True,
                block_types: tuple[type[nn.Module], ...] = BLOCK_TYPES) -> nn.Module:
    """Shard `model` in place: experts over `meshes.ep` (+ FSDP2 over `meshes.experts_dp`), the rest FSDP2 over
    `meshes.dense`. Build the optimizer afterwards, from `model.named_parameters()` (names are unchanged).

    `param_dtype` (torch.bfloat16 for `precision=bf16`, torchtitan's default): the dtype parameters are gathered
    and computed in (`mixed_precision_policy`), except the MoE layers' routing parameters (`phi`, a sparse
    router), which stay float32 in a unit of their own: routing is computed in float32 (README "Scaling out").
    """
    _average_scalar_grads(model, meshes.world)
    fsdp = {"mp_policy": mixed_precision_policy(param_dtype), "reshard_after_forward": reshard_after_forward,
            "ignored_params": {p for p in model.parameters() if p.ndim == 0}}
    dense_mesh = _fsdp_mesh(meshes.dense)
    for layer in expert_layers(model).values():
        if meshes.ep.size() > 1:
            apply_expert_parallel(layer.experts, meshes.ep)
        fully_shard(layer.experts, mesh=_fsdp_mesh(meshes.experts_dp), **fsdp)
        layer.experts.set_gradient_divide_factor(meshes.world_size)
        # A custom factor makes FSDP2 reduce-scatter with NCCL's PREMUL_SUM, which gloo lacks: sum, then divide.
        # Not with a one-rank shard group: torch 2.14 then divides twice (tests/test_parallel.py checks both).
        layer.experts.set_force_sum_reduction_for_comms(meshes.experts_dp["efsdp"].size() > 1)
        if param_dtype is not None:
            fully_shard(layer, mesh=dense_mesh, **(fsdp | {"mp_policy": mixed_precision_policy(None)}))
    for block in [m for m in model.modules() if isinstance(m, block_types)]:
        fully_shard(block, mesh=dense_mesh, **fsdp)
    # Evaluation calls the image trunk and head directly (pre-logit features): as groups of their own they gather
    # their parameters on those calls. The root's own (the text tower's embeddings, final norm and projection) are
    # gathered for an evaluation by `unsharded_root` (registering `encode_text` as a forward method instead would
    # nest the root's hooks inside `forward`, which changes what training gathers).
    for entry in _entry_modules(model):
        fully_shard(entry, mesh=dense_mesh, **fsdp)
    fully_shard(model, mesh=dense_mesh, **fsdp)
    return model


@contextlib.contextmanager
def unsharded_root(model: nn.Module) -> Iterator[nn.Module]:
    """Hold the root group's parameters gathered (on every process) while a caller runs the towers outside
    `forward` (`encode_text`, `encode_image`), as evaluation does; not recursive: the other groups gather
    themselves when called."""
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """Sub-modules of an open_clip model that callers run on their own: the timm image trunk and its head."""
    visual = getattr(model, "visual", None)
    return [m for m in (getattr(visual, "trunk", None), getattr(visual, "head", None))
            if isinstance(m, nn.Module) and any(p.ndim > 0 for p in m.parameters())]
