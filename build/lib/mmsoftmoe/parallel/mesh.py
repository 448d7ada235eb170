"""The device meshes of a parallel layout: data parallel (replicate x shard) for dense parameters, and the
expert layout (replicate x expert-FSDP x expert-parallel) that borrows its `ep` ranks from `dp_shard`.

torchtitan's `ParallelDims` layout (`torchtitan/distributed/parallel_dims.py`): one world mesh, unflattened
twice, so that both views are sub-meshes of the same root (FSDP2 needs that to combine an FSDP mesh with the
expert-parallel one). Every rank is a data rank: world = dp_replicate * dp_shard, and ep divides dp_shard, so
`efsdp = dp_shard / ep` ranks shard each expert-parallel shard further with FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelMeshes:
    """`world` (every rank, 1-D); `dense` ("dp_replicate", "dp_shard") for dense parameters; `experts_dp`
    ("edp_replicate", "efsdp") for the data-parallel reduction of expert parameters; `ep` ("ep") over which the
    experts are split."""

    world: DeviceMesh
    dense: DeviceMesh
    experts_dp: DeviceMesh
    ep: DeviceMesh

    @property
    def world_size(self) -> int:
        return self.world.size()


def check_layout(*, world_size: int, dp_replicate: int, dp_shard: int, ep: int,
                 num_experts: tuple[int, ...] = ()) -> None:
    """Raise one ValueError naming what is wrong with a layout and how to fix it."""
    for name, value in (("dp_replicate", dp_replicate), ("dp_shard", dp_shard), ("ep", ep)):
        if value < 1:
            raise ValueError(f"parallel.{name} must be >= 1, got {value}")
    if dp_replicate * dp_shard != world_size:
        raise ValueError(
            f"parallel.dp_replicate * parallel.dp_shard = {dp_replicate} * {dp_shard} = {dp_replicate * dp_shard} "
            f"does not match the {world_size} processes launched; set them so their product is {world_size}")
    if dp_shard % ep:
        raise ValueError(
            f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard} (expert-parallel ranks are borrowed from "
            f"the sharded data-parallel ranks); choose ep among {_divisors(dp_shard)}")
    for n in sorted(set(num_experts)):
        if n % ep:
            raise ValueError(
                f"parallel.ep={ep} does not divide the model's {n} experts (each rank holds num_experts / ep); "
                f"choose ep among {[d for d in _divisors(n) if dp_shard % d == 0]}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def build_meshes(*, device_type: str, dp_replicate: int, dp_shard: int, ep: int) -> ParallelMeshes:
    """The meshes of a checked layout over the default process group (already initialised)."""
    world = init_device_mesh(device_type, (dp_replicate * dp_shard,), mesh_dim_names=("world",))
    dense = world._unflatten(0, (dp_replicate, dp_shard), ("dp_replicate", "dp_shard"))
    experts = world._unflatten(0, (dp_replicate, dp_shard // ep, ep), ("edp_replicate", "efsdp", "ep"))
    return ParallelMeshes(world=world, dense=dense, experts_dp=experts["edp_replicate", "efsdp"], ep=experts["ep"])
