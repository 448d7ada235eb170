"""Expert parallelism: each rank holds n / ep of a layer's stacked experts and exchanges slots by all-to-all.

vmoe `moe.py` (`_dispatch` / `_receive`) and torchtitan `distributed/expert_parallel.py` (`ExpertParallel`):
the experts' stacked weights become DTensors sharded on the expert axis over the `ep` mesh, and hooks around
the experts module move its input from the data-sharded layout (every rank: all n experts, its own k slots) to
the expert-sharded one (every rank: its n / ep experts, the k slots of all ep ranks) and back. The layers stay
unaware: they call `self.experts(x_nkd)` as on one process.

Legend: n experts, e = n / ep local experts, r = ep ranks, k slots (or buffer positions) per expert on one rank,
d input width, o output width. Soft MoE and fixed-capacity sparse layers have the same k on every rank, so both
all-to-alls use equal static splits: no host synchronisation, no dynamic shapes (torchtitan's ragged splits
need a device-to-host copy of the token counts).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_module, distribute_tensor

from mmsoftmoe.layers import StackedExperts


def _shard_experts(name: str, module: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Replace the stacked parameters (n, ...) of `module` itself by DTensors sharded on the expert axis."""
    for param_name, param in list(module.named_parameters(recurse=False)):
        module.register_parameter(param_name, nn.Parameter(distribute_tensor(param, ep_mesh, [Shard(0)])))


def _dispatch(module: nn.Module, inputs: tuple[torch.Tensor], ep_mesh: DeviceMesh) -> tuple[DTensor]:
    """(n, k, d) slots of this rank's examples -> (e, r*k, d) slots of all ranks for this rank's experts."""
    (x_nkd,) = inputs
    n, k, d = x_nkd.shape
    r = ep_mesh.size()
    # Equal splits on the leading axis: chunk j (experts j*e .. (j+1)*e - 1) goes to rank j.
    x_rekd = all_to_all_single_autograd(x_nkd.contiguous(), None, None, ep_mesh).view(r, n // r, k, d)
    x_ekd = x_rekd.transpose(0, 1).reshape(n // r, r * k, d)
    return (DTensor.from_local(x_ekd, ep_mesh, [Shard(0)], run_check=False),)


def _combine(module: nn.Module, y: DTensor, ep_mesh: DeviceMesh) -> torch.Tensor:
    """(e, r*k, o) outputs of this rank's experts -> (n, k, o) outputs for this rank's slots."""
    y_eko = y.to_local()
    e, rk, o = y_eko.shape
    r = ep_mesh.size()
    y_reko = y_eko.view(e, r, rk // r, o).transpose(0, 1).contiguous()
    return all_to_all_single_autograd(y_reko.view(r * e, rk // r, o), None, None, ep_mesh)


def apply_expert_parallel(experts: StackedExperts, ep_mesh: DeviceMesh) -> None:
    """Shard `experts` over `ep_mesh` in place and route its calls through the two all-to-alls."""
    if experts.num_experts % ep_mesh.size():
        raise ValueError(f"ep={ep_mesh.size()} does not divide num_experts={experts.num_experts}; "
                         "choose an ep that divides the number of experts")
    distribute_module(experts, ep_mesh, partition_fn=_shard_experts, input_fn=_dispatch, output_fn=_combine)
