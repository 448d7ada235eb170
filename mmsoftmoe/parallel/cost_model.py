"""A scale-out planner: per-GPU memory, collective bytes and step time of DDP, FSDP2 and FSDP2 + EP layouts.

`mmsoftmoe plan --config C --gpus N --gpu-memory GB` counts the model exactly on the meta device (parameters
split into experts, FSDP2 units and 0-d parameters as `parallelize` splits them; activations from the tensors
autograd saves in one forward; FLOPs from `accounting.count_flops`) and derives, for every layout the mesh
allows (`mesh.check_layout`), what one process holds and what one step moves.

Memory per process (bytes; P = parameters, fp32 master weights and AdamW, so 16 B/param when whole):
  - state: parameters + gradients + two AdamW moments, 4 x 4 B each, of the local shard: everything under DDP;
    dense units padded to a multiple of dp_shard along dim 0 (as FSDP2 pads) / dp_shard under FSDP2; experts /
    ep, then padded and / efsdp under FSDP2+EP; 0-d parameters always whole.
  - buffers: DDP's gradient buckets (one more fp32 copy of the gradients); FSDP2's unsharded all-gather output of
    the largest unit, twice (the next unit is prefetched; bf16 under `precision=bf16`), plus its reduce-scatter
    input (fp32); EP's all-to-all buffers (input and output of the largest layer's dispatch, at the micro-batch).
  - activations: the bytes autograd saves in one forward at the micro-batch (per process), measured on the meta
    device and scaled linearly in the batch; with grad checkpointing what the checkpointed blocks keep plus the
    largest block's own activations, live again while it is recomputed in backward.
    Measured in fp32; under bf16 autocast taken as half (an approximation: autocast keeps some tensors fp32).
    Not counted: the loss's logits (b x global b); temporaries that live only inside one op; the allocator's
    caching/fragmentation, CUDA context, the interpreter and libraries (CPU runs: see benchmarks/plan_check.py).

Collective payload per step and process, the definition `benchmarks/dist_bench.py` traces (the largest tensor of
each call): DDP all-reduces every gradient (fp32) once and broadcasts the module buffers; FSDP2 all-gathers every
unit (padded) in forward and again in backward (reshard_after_forward), in bf16 under `precision=bf16` (the MoE
routing parameters in fp32), and reduce-scatters each once in fp32; a unit on a one-rank mesh moves nothing; 0-d
parameters are all-reduced (4 B each), and under HSDP (dp_replicate > 1) the reduced shards too; EP does 4
all-to-alls per MoE layer (dispatch and combine, forward and backward) of local_batch x slots x width; the
contrastive loss all-gathers image and text features (local_batch x embed_dim each).

Start-up host memory per process: DDP builds the whole model on the host; a sharded start-up draws one parameter
(or one expert's slice) at a time there and keeps only its shards (`mmsoftmoe.parallel.init_sharded_`).

Step time = compute + communication, no overlap assumed (an upper bound):
  compute: 3 x forward FLOPs x global batch / (GPUs x achieved FLOP/s) (`--tflops`, default 400 TFLOP/s: about
  40% of an H100's 989 dense bf16 TFLOP/s).
  communication: ring algorithms, n ranks in a group: all-gather and reduce-scatter move (n-1)/n of the payload
  over each rank's link, all-reduce 2(n-1)/n, all-to-all (n-1)/n; a group inside one node (`--gpus-per-node`)
  runs at `--nvlink-gbps`, a group spanning nodes at `--link-gbps` (per GPU, GB/s).
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mmsoftmoe.models.accounting import count_flops
from mmsoftmoe.parallel.mesh import _divisors, check_layout
from mmsoftmoe.parallel.parallelize import BLOCK_TYPES, expert_layers

FP32 = 4
GIB = 2**30


@dataclass(frozen=True)
class ModelCounts:
    """What the planner needs of a model: parameter shapes by FSDP2 unit, MoE layers, activations, FLOPs."""

    expert_shapes: list[tuple[int, ...]]           # every expert parameter (dim 0 = experts)
    dense_units: list[list[tuple[int, ...]]]       # per FSDP2 unit (blocks, then the root remainder)
    scalar_params: int                             # 0-d parameters, kept whole
    buffer_bytes: int                              # module buffers (DDP broadcasts them every forward)
    moe_layers: list[tuple[int, int, int]]         # (slots per example, in width, out width) per MoE layer
    num_experts: tuple[int, ...]
    embed_dim: int
    activation_bytes_per_example: float
    forward_flops_per_example: int
    routing_shapes: list[tuple[int, ...]] = field(default_factory=list)  # MoE routing parameters (kept fp32)
    recompute_bytes_per_example: float = 0.0       # grad checkpointing: the largest block's activations
    largest_draw: int = 0                          # elements of the largest start-up draw (a parameter, an expert)

    @property
    def expert_params(self) -> int:
        return sum(math.prod(s) for s in self.expert_shapes)

    @property
    def dense_params(self) -> int:
        return sum(math.prod(s) for unit in self.dense_units for s in unit)

    @property
    def total_params(self) -> int:
        return self.expert_params + self.dense_params + self.scalar_params


def _padded(shapes: list[tuple[int, ...]], shards: int, dim0_div: int = 1) -> int:
    """Elements after FSDP2 pads dim 0 (divided by `dim0_div` first, as EP splits experts) to a multiple of
    `shards`."""
    return sum(math.ceil(s[0] // dim0_div / shards) * shards * math.prod(s[1:]) for s in shapes)


def parameter_units(model: nn.Module) -> tuple[list[tuple[int, ...]], list[list[tuple[int, ...]]], int]:
    """(expert shapes, dense shapes per FSDP2 unit, number of 0-d parameters), as `parallelize` splits them."""
    expert_ids = {id(p) for layer in expert_layers(model).values() for p in layer.experts.parameters()}
    experts = [tuple(p.shape) for layer in expert_layers(model).values() for p in layer.experts.parameters()]
    owned, units = set(expert_ids), []
    for block in [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]:
        unit = [p for p in block.parameters() if id(p) not in owned and p.ndim]
        owned |= {id(p) for p in block.parameters()}
        units.append([tuple(p.shape) for p in unit])
    units.append([tuple(p.shape) for p in model.parameters() if id(p) not in owned and p.ndim])
    scalars = sum(1 for p in model.parameters() if p.ndim == 0)
    return experts, units, scalars


def _meta_inputs(model: nn.Module, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.visual.trunk.patch_embed.img_size if hasattr(model.visual, "trunk") else model.visual.image_size
    context = model.context_length if hasattr(model, "context_length") else 77
    return (torch.zeros(batch, 3, *size, device="meta"), torch.zeros(batch, context, dtype=torch.long, device="meta"))


def activation_bytes(model: nn.Module, batch: int = 2) -> float:
    """Bytes autograd saves for backward in one training forward, per example (fp32), measured on the meta device.

    Tensors are counted once each (by identity); parameters saved for backward are not activations."""
    params = {id(p) for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in params and not isinstance(t, nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*_meta_inputs(model, batch))
    return sum(seen.values()) / batch


def block_activation_bytes(model: nn.Module, batch: int = 2) -> float:
    """The largest bytes one block (`BLOCK_TYPES`) saves for backward in a forward without checkpointing, per
    example: what a checkpointed block holds again while it is recomputed in backward."""
    params = {id(p) for p in model.parameters()}
    per_block: dict[int, dict[int, int]] = defaultdict(dict)
    current: list[int] = []

    def enter(module: nn.Module, args: tuple) -> None:
        current.append(id(module))

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        current.pop()

    handles = []
    for block in (m for m in model.modules() if isinstance(m, BLOCK_TYPES)):
        handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current and id(t) not in params and not isinstance(t, nn.Parameter):
            per_block[current[-1]][id(t)] = t.numel() * t.element_size()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*_meta_inputs(model, batch))
    for handle in handles:
        handle.remove()
    return max((sum(saved.values()) for saved in per_block.values()), default=0) / batch


def largest_draw(model: nn.Module) -> int:
    """Elements of the largest tensor start-up draws at once (`mmsoftmoe.parallel.init_sharded_`): a whole
    unstacked parameter, or one expert's slice of a stacked one."""
    experts = {id(p) for layer in expert_layers(model).values() for p in layer.experts.parameters()}
    return max(p[0].numel() if id(p) in experts else p.numel() for p in model.parameters())


def count_model(model: nn.Module, *, grad_checkpointing: bool = False) -> ModelCounts:
    """Count a CLIP model built on the meta device."""
    experts, units, scalars = parameter_units(model)
    layers = expert_layers(model)
    expert_ids = {id(p) for layer in layers.values() for p in layer.experts.parameters()}
    routing = [tuple(p.shape) for layer in layers.values() for p in layer.parameters()
               if id(p) not in expert_ids and p.ndim]
    recompute = block_activation_bytes(model) if grad_checkpointing else 0.0
    trunk = model.visual.trunk
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    # Rows dispatched per example over all experts (Soft MoE: its slots), what the EP all-to-all moves.
    moe = [(layer.expert_rows_per_example(tokens) * layer.num_experts, layer.in_features, layer.out_features)
           for layer in layers.values()]
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    acts = activation_bytes(model)
    flops = count_flops(lambda: model(*_meta_inputs(model, 1)))
    embed = model.text_projection.shape[1] if getattr(model, "text_projection", None) is not None else 0
    return ModelCounts(expert_shapes=experts, dense_units=units, scalar_params=scalars,
                       buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
                       moe_layers=moe, num_experts=tuple(m.num_experts for m in layers.values()),
                       embed_dim=embed or trunk.num_features, activation_bytes_per_example=acts,
                       forward_flops_per_example=flops, routing_shapes=routing,
                       recompute_bytes_per_example=recompute, largest_draw=largest_draw(model))


@dataclass(frozen=True)
class Layout:
    name: str            # ddp | fsdp2 | fsdp2+ep
    dp_replicate: int
    dp_shard: int        # 1 under DDP
    ep: int

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def overrides(self) -> str:
        if self.name == "ddp":
            return "parallel.dp_shard=0"
        return f"parallel.dp_replicate={self.dp_replicate} parallel.dp_shard={self.dp_shard} parallel.ep={self.ep}"


@dataclass
class LayoutPlan:
    layout: Layout
    memory: dict[str, float]          # bytes per process by kind, and "total"
    collective_bytes: dict[str, int]  # payload per step and process by kind (dist_bench's definition)
    compute_s: float
    comm_s: float
    fits: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.comm_s


def collective_bytes(counts: ModelCounts, layout: Layout, local_batch: int, act_bytes: int = FP32,
                     param_bytes: int = FP32) -> dict[str, int]:
    """Payload bytes of one step's collectives on one process, by kind (dist_bench's `CollectiveBytes`).

    `param_bytes`: the dtype FSDP2 gathers parameters in (2 for `parallelize(param_dtype=torch.bfloat16)`), except
    the MoE routing parameters, gathered in fp32; gradients are reduced in fp32 either way."""
    out: dict[str, int] = {}
    if layout.world == 1:
        return out
    out["all_gather"] = 2 * local_batch * counts.embed_dim * act_bytes  # image + text features
    if layout.name == "ddp":
        out["all_reduce"] = counts.total_params * FP32
        out["broadcast"] = counts.buffer_bytes
        return out
    efsdp = layout.dp_shard // layout.ep
    dense = sum(_padded(u, layout.dp_shard) for u in counts.dense_units) if layout.dp_shard > 1 else 0
    experts = _padded(counts.expert_shapes, efsdp, layout.ep) if efsdp > 1 else 0
    routing = _padded(counts.routing_shapes, layout.dp_shard) if layout.dp_shard > 1 else 0
    out["all_gather"] += 2 * ((dense + experts) * param_bytes + routing * (FP32 - param_bytes))
    out["reduce_scatter"] = (dense + experts) * FP32
    out["all_reduce"] = counts.scalar_params * FP32
    if layout.dp_replicate > 1:  # HSDP: the reduced shards (experts' too, even unsharded) all-reduced over replicas
        expert_shard = _padded(counts.expert_shapes, efsdp, layout.ep) // efsdp
        out["all_reduce"] += (dense // layout.dp_shard + expert_shard) * FP32
    if layout.ep > 1:
        out["all_to_all"] = sum(2 * local_batch * slots * (d_in + d_out) * act_bytes
                                for slots, d_in, d_out in counts.moe_layers)
    return out


def memory_bytes(counts: ModelCounts, layout: Layout, local_batch: int, act_scale: float = 1.0,
                 param_bytes: int = FP32) -> dict[str, float]:
    """Bytes one process holds at its peak, by kind (see the module docstring)."""
    state = 4 * FP32  # parameter, gradient, two AdamW moments
    if layout.name == "ddp":
        mem = {"state": counts.total_params * state, "buffers": counts.total_params * FP32}
    else:
        efsdp = layout.dp_shard // layout.ep
        dense = sum(_padded(u, layout.dp_shard) for u in counts.dense_units) / layout.dp_shard
        experts = _padded(counts.expert_shapes, efsdp, layout.ep) / efsdp
        largest = max([_padded(u, layout.dp_shard) for u in counts.dense_units]
                      + [_padded(counts.expert_shapes, efsdp, layout.ep) // max(len(counts.moe_layers), 1)])
        a2a = max([2 * local_batch * slots * max(d_in, d_out) * FP32 * act_scale
                   for slots, d_in, d_out in counts.moe_layers] or [0]) if layout.ep > 1 else 0
        gathered = 2 * largest * param_bytes + largest * FP32  # two units gathered, one reduce-scatter input
        mem = {"state": (dense + experts + counts.scalar_params) * state, "buffers": gathered + a2a}
    acts = counts.activation_bytes_per_example + counts.recompute_bytes_per_example
    mem["activations"] = acts * local_batch * act_scale
    mem["total"] = sum(mem.values())
    return mem


def layouts(world: int, num_experts: tuple[int, ...], dp_replicate: int | None = None) -> list[Layout]:
    """DDP, then FSDP2 and FSDP2+EP for every ep dividing both dp_shard and the experts, at `dp_replicate`
    replicas, or (None) at every dp_replicate dividing `world` that leaves dp_shard > 1 (HSDP when > 1)."""
    out = [Layout("ddp", world, 1, 1)]
    for replicas in [dp_replicate] if dp_replicate else [r for r in _divisors(world) if r < world or world == 1]:
        dp_shard = world // replicas
        for ep in _divisors(dp_shard):
            if all(n % ep == 0 for n in num_experts):
                out.append(Layout("fsdp2" if ep == 1 else "fsdp2+ep", replicas, dp_shard, ep))
    return out


def _ring_s(kind: str, payload: float, group: int, gbps: float) -> float:
    factor = {"all_reduce": 2.0, "broadcast": 1.0}.get(kind, 1.0) * (group - 1) / group
    return payload * factor / (gbps * 1e9) if group > 1 else 0.0


def plan_layout(counts: ModelCounts, layout: Layout, *, global_batch: int, grad_accum: int = 1,
                gpu_memory_gib: float, bf16: bool = False, tflops: float = 400.0, nvlink_gbps: float = 450.0,
                link_gbps: float = 50.0, gpus_per_node: int = 8) -> LayoutPlan:
    """Memory, collective bytes and step time of one layout."""
    check_layout(world_size=layout.world, dp_replicate=layout.dp_replicate if layout.name != "ddp" else layout.world,
                 dp_shard=layout.dp_shard, ep=layout.ep, num_experts=counts.num_experts)
    if global_batch % (layout.world * grad_accum):
        raise ValueError(f"batch_size={global_batch} does not split into {grad_accum} micro-batches on "
                         f"{layout.world} GPUs; choose a batch_size divisible by {layout.world * grad_accum}")
    local = global_batch // (layout.world * grad_accum)
    act = 2 if bf16 else FP32
    mem = memory_bytes(counts, layout, local, act_scale=act / FP32, param_bytes=act)
    comm = collective_bytes(counts, layout, local, act, param_bytes=act)
    # Parameter collectives repeat for every micro-batch under FSDP2 (resharded between them); DDP reduces once.
    repeat = {k: (grad_accum if layout.name != "ddp" or k not in ("all_reduce",) else 1) for k in comm}
    dense_group = layout.world if layout.name == "ddp" else layout.dp_shard
    group = {"all_to_all": layout.ep, "all_gather": dense_group, "reduce_scatter": dense_group,
             "all_reduce": layout.world, "broadcast": layout.world}

    def gbps(n: int) -> float:
        return nvlink_gbps if n <= gpus_per_node else link_gbps

    comm_s = sum(_ring_s(k, v * repeat[k], group[k], gbps(group[k])) for k, v in comm.items())
    compute_s = 3 * counts.forward_flops_per_example * global_batch / (layout.world * tflops * 1e12)
    return LayoutPlan(layout, mem, comm, compute_s, comm_s, fits=mem["total"] <= gpu_memory_gib * GIB,
                      extra={"local_batch": local, "startup_host_bytes": startup_host_bytes(counts, layout)})


def startup_host_bytes(counts: ModelCounts, layout: Layout) -> int:
    """Host memory one process needs to start: DDP builds the whole model on the host (then moves it); a sharded
    start-up (`init_sharded_`) draws one parameter (one expert's slice) at a time on the host and copies its
    shard to the GPU. A warm start or upcycling reads a whole file on rank 0 instead (README "Scaling out")."""
    if layout.name == "ddp":
        return (counts.total_params + counts.largest_draw) * FP32
    return counts.largest_draw * FP32


def plan(counts: ModelCounts, *, gpus: int, global_batch: int, gpu_memory_gib: float,
         dp_replicate: int | None = None, **kw) -> list[LayoutPlan]:
    """Every layout at `gpus`, the fitting ones first by step time."""
    plans = [plan_layout(counts, lay, global_batch=global_batch, gpu_memory_gib=gpu_memory_gib, **kw)
             for lay in layouts(gpus, counts.num_experts, dp_replicate)]
    return sorted(plans, key=lambda p: (not p.fits, p.step_s))


def format_table(plans: list[LayoutPlan]) -> str:
    head = (f"{'layout':<9}{'rep':>4}{'shard':>6}{'ep':>5}{'state GiB':>10}{'buf GiB':>9}{'act GiB':>9}"
            f"{'total GiB':>10}{'comm GB':>9}{'step s':>8}{'host GiB':>9}  fits")
    rows = [head]
    for p in plans:
        m, lay = p.memory, p.layout
        rows.append(f"{lay.name:<9}{lay.dp_replicate:>4}{lay.dp_shard:>6}{lay.ep:>5}{m['state'] / GIB:>10.2f}"
                    f"{m['buffers'] / GIB:>9.2f}{m['activations'] / GIB:>9.2f}{m['total'] / GIB:>10.2f}"
                    f"{sum(p.collective_bytes.values()) / 1e9:>9.2f}{p.step_s:>8.3f}"
                    f"{p.extra['startup_host_bytes'] / GIB:>9.2f}  {'yes' if p.fits else 'no'}")
    return "\n".join(rows)


def to_json(plans: list[LayoutPlan]) -> list[dict]:
    return [{"layout": asdict(p.layout), "overrides": p.layout.overrides, "memory_bytes": p.memory,
             "collective_bytes": p.collective_bytes, "compute_s": p.compute_s, "comm_s": p.comm_s,
             "step_s": p.step_s, "fits": p.fits, **p.extra} for p in plans]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    parser.add_argument("--tflops", type=float, default=400.0,
                        help="achieved TFLOP/s per GPU (default 400: ~40%% of H100 dense bf16 peak)")
    parser.add_argument("--nvlink-gbps", type=float, default=450.0, help="GB/s per GPU within a node")
    parser.add_argument("--link-gbps", type=float, default=50.0, help="GB/s per GPU between nodes")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--json", action="store_true")


# flag -> (minimum, strict): a GPU count of at least one, memory, throughput and bandwidths above zero.
ARGUMENT_MINIMUMS = {"--gpus": (1, False), "--gpus-per-node": (1, False), "--gpu-memory": (0, True),
                     "--tflops": (0, True), "--nvlink-gbps": (0, True), "--link-gbps": (0, True)}


SCALING_CONFIGS = ("softmoe_b16_sigmoid_256", "softmoe_l16_sigmoid", "softmoe_h14_sigmoid")


def best(plans: list[LayoutPlan]) -> LayoutPlan | None:
    """The fastest layout that fits, or None."""
    return next((p for p in plans if p.fits), None)


def run(counts: ModelCounts, args: argparse.Namespace, *, global_batch: int, grad_accum: int, bf16: bool,
        dp_replicate: int | None = None) -> dict:
    """Print the table of every layout at `args.gpus` and the fastest fitting one; return it as JSON."""
    plans = plan(counts, gpus=args.gpus, global_batch=global_batch, gpu_memory_gib=args.gpu_memory,
                 dp_replicate=dp_replicate, grad_accum=grad_accum, bf16=bf16, **link_kwargs(args))
    chosen = best(plans)
    result = {"gpus": args.gpus, "gpu_memory_gib": args.gpu_memory, "parameters": counts.total_params,
              "expert_parameters": counts.expert_params, "layouts": to_json(plans),
              "best": chosen.layout.overrides if chosen else None}
    if args.json:
        print(json.dumps(result, indent=2))
        return result
    print(f"{counts.total_params / 1e9:.3f}B parameters ({counts.expert_params / 1e9:.3f}B in experts), "
          f"{args.gpus} GPUs x {args.gpu_memory:g} GiB, global batch {global_batch}")
    print(format_table(plans))
    print(f"fastest layout that fits: {chosen.layout.name}, {chosen.step_s:.3f} s/step; overrides: "
          f"{chosen.layout.overrides}" if chosen else "no layout fits: more GPUs, grad accumulation or checkpointing")
    return result


def link_kwargs(args: argparse.Namespace) -> dict:
    return {"tflops": args.tflops, "nvlink_gbps": args.nvlink_gbps, "link_gbps": args.link_gbps,
            "gpus_per_node": args.gpus_per_node}


def scaling(counted: dict[str, tuple[ModelCounts, int, int, bool]], args: argparse.Namespace,
            gpus: tuple[int, ...] = tuple(2**k for k in range(3, 11)), png: str | None = None) -> list[dict]:
    """The fastest fitting layout of each model at 8..1024 GPUs, with the fewest gradient-accumulation steps
    (the config's, doubled until a layout fits); `counted`: name -> (counts, batch, accum, bf16)."""
    rows = []
    for name, (counts, batch, accum, bf16) in counted.items():
        for n in gpus:
            b, acc = None, accum
            # Too little memory for the config's micro-batch: accumulate over more, smaller micro-batches.
            while b is None and batch % (n * acc) == 0:
                b = best(plan(counts, gpus=n, global_batch=batch, gpu_memory_gib=args.gpu_memory, grad_accum=acc,
                              bf16=bf16, **link_kwargs(args)))
                acc *= 2 if b is None else 1
            rows.append({"config": name, "gpus": n, "layout": b.layout.name if b else None,
                         "ep": b.layout.ep if b else None, "grad_accum_steps": acc,
                         "memory_gib": b.memory["total"] / GIB if b else None,
                         "step_s": b.step_s if b else None, "comm_s": b.comm_s if b else None,
                         "overrides": f"{b.layout.overrides} grad_accum_steps={acc}" if b else None})
    print(f"{'config':<26}{'gpus':>6}  {'layout':<9}{'ep':>5}{'accum':>6}{'GiB/GPU':>9}{'step s':>9}{'comm s':>8}")
    for r in rows:
        if r["layout"] is None:
            print(f"{r['config']:<26}{r['gpus']:>6}  no layout fits")
            continue
        print(f"{r['config']:<26}{r['gpus']:>6}  {r['layout']:<9}{r['ep']:>5}{r['grad_accum_steps']:>6}"
              f"{r['memory_gib']:>9.1f}"
              f"{r['step_s']:>9.3f}{r['comm_s']:>8.3f}")
    if png:
        _plot(rows, png)
    return rows


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib.pyplot as plt

    from mmsoftmoe.figures import save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["gpus"], r["step_s"]) for r in rows if r["config"] == name and r["step_s"]]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="estimated step time (s)",
           title="Fastest fitting layout per GPU count")
    ax.legend()
    save_figure(fig, path, dpi=120)
