"""Step time, start-up and per-process memory of DDP, FSDP2, FSDP2 + expert parallelism and HSDP at 1, 2 and 4
processes, in float32 and with bf16 FSDP2.

Run as `python -m benchmarks.dist_bench [--model SoftMoE-Micro-4-32] [--procs 1,2,4] [--batch 16] [--steps 8]
[--layouts fsdp2,fsdp2-bf16]`.

Each layout runs in its own `torchrun` launch (gloo on CPU) so that each process's peak memory is its own:
`ddp` (accelerate's DDP, today's trainer), `fsdp2` (dp_shard = N, ep = 1) and `fsdp2+ep` (dp_shard = N,
ep = N, and ep = 2 with FSDP2 over the other 2 at 4 processes), `hsdp` at 4 (2 replicas x 2 shards, ep = 2),
`fsdp2-bf16` (FSDP2 gathering bf16 parameters, `parallelize(param_dtype=torch.bfloat16)`, under bf16 autocast, as
`precision=bf16` runs); `single` at one process is the reference. The training step is the trainer's
(`training.loop.train_step`, global-norm clipping, AdamW) on a fixed global batch split over the processes;
sharded layouts build the model on the meta device and each process draws only its shards (`init_sharded_`).
Reported per layout: the median step time (the slowest process), each process's peak resident memory during
start-up (materializing the weights) above its resident memory before, against the target model bytes / the
processes it is sharded over (dp_shard) + the largest parameter's bytes (`startup_target`), for the process's
first start-up and for a second one in the same process (`startup_warm`: without the one-time costs of a first
use), the peak resident memory of each process above its resident memory before the model was built, the
training state each process holds (parameters, gradients, AdamW moments: local shards, bytes) split into experts
and the rest, and the payload of the collectives of one traced step by kind (all-gather, reduce-scatter,
all-to-all, ...).
The expert state per process must be the single-process figure / (processes the experts are split over).
Several processes on a 2-core machine share its cores: their step times measure contention, not scaling.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.common import check_machine, write_results
from benchmarks.train_bench import make_batch
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.parallel import (
    build_meshes,
    check_layout,
    clip_grad_norm_,
    expert_layers,
    init_sharded_,
    parallelize,
)
from mmsoftmoe_training.loop import build_loss, train_step
from mmsoftmoe_training.optim import build_optimizer

# name -> (dp_shard, ep) as functions of the process count; None: not sharded (DDP, or one plain process).
LAYOUTS = {
    "single": lambda n: None,
    "ddp": lambda n: None,
    "fsdp2": lambda n: (n, 1),
    "fsdp2+ep": lambda n: (n, n),
    "fsdp2+ep2": lambda n: (n, 2),
    "hsdp": lambda n: (n // 2, 2),
    "fsdp2-bf16": lambda n: (n, 1),
}


def layouts_for(procs: int) -> list[str]:
    if procs == 1:
        return ["single"]
    return ["ddp", "fsdp2", "fsdp2+ep", "fsdp2-bf16"] + (["fsdp2+ep2", "hsdp"] if procs > 2 else [])


def replicas(layout: str, procs: int) -> int:
    """dp_replicate of a sharded layout (HSDP: the processes over dp_shard)."""
    sharding = LAYOUTS[layout](procs)
    return procs // sharding[0] if sharding else 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """The resident high-water mark since the process started or `reset_peak_rss` (Linux `VmHWM`)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Set the high-water mark to the current resident size (Linux `clear_refs` 5), so that a later peak
    measures a window, not the imports before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if isinstance(t, DTensor) else t
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Local bytes of parameters, gradients and optimizer state, for the experts and for the rest."""
    expert_params = {id(p) for layer in expert_layers(model).values() for p in layer.experts.parameters()}
    out = {"experts": 0, "rest": 0}
    for p in model.parameters():
        kind = "experts" if id(p) in expert_params else "rest"
        tensors = [p, *([p.grad] if p.grad is not None else []),
                   *(v for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor) and v.ndim)]
        out[kind] += sum(local_bytes(t) for t in tensors)
    return out


COLLECTIVE_KINDS = {"allgather": "all_gather", "all_gather": "all_gather", "reduce_scatter": "reduce_scatter",
                    "all_to_all": "all_to_all", "allreduce": "all_reduce", "all_reduce": "all_reduce",
                    "broadcast": "broadcast"}


class CollectiveBytes(TorchDispatchMode):
    """Payload bytes of the collectives a process issues, by kind: the largest tensor of each call (the gathered
    output of an all-gather, the unreduced input of a reduce-scatter, the buffer of an all-reduce or all-to-all).
    Sees every collective that goes through torch's dispatcher: FSDP2's, DTensor's, functional ones, DDP's."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        kind = next((k for key, k in COLLECTIVE_KINDS.items() if key in name), None)
        if func.namespace in ("c10d", "_c10d_functional") and kind is not None:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            self.bytes[kind] += max(t.numel() * t.element_size() for t in tensors)
        return func(*args, **(kwargs or {}))


def model_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of all parameters and buffers, bytes of the largest parameter) of a model built on any device."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors), max(p.numel() * p.element_size()
                                                                    for p in model.parameters())


def build(model_name: str, layout: str, world: int) -> tuple[torch.nn.Module, object, int]:
    """(model, tokenizer, start-up peak bytes) of `layout`: built on the meta device, parallelized if sharded,
    then materialized with every process drawing what it holds (the whole model when not sharded: the values of
    `build_clip(model_name)` after `torch.manual_seed(0)`). The start-up peak is the resident high-water mark of
    the materialization above the resident size before it (the structure built on the meta device holds no
    weights; its Python objects and the tokenizer are not counted)."""
    model, tokenizer = build_clip(model_name, device="meta")
    sharding = LAYOUTS[layout](world)
    if sharding is not None:
        dp_shard, ep = sharding
        check_layout(world_size=world, dp_replicate=world // dp_shard, dp_shard=dp_shard, ep=ep,
                     num_experts=tuple(m.num_experts for m in expert_layers(model).values()))
        meshes = build_meshes(device_type="cpu", dp_replicate=world // dp_shard, dp_shard=dp_shard, ep=ep)
        parallelize(model, meshes, param_dtype=torch.bfloat16 if layout.endswith("-bf16") else None)
    reset_peak_rss()
    start = rss_bytes()
    init_sharded_(model, seed=0, device="cpu")
    return model, tokenizer, peak_rss_bytes() - start


def worker(model_name: str, layout: str, batch_size: int, steps: int, out_dir: Path) -> None:
    # Sets up the gloo process group under torchrun; bf16 layouts run under bf16 autocast, as the trainer does.
    accelerator = Accelerator(cpu=True, mixed_precision="bf16" if layout.endswith("-bf16") else "no")
    rank, world = accelerator.process_index, accelerator.num_processes
    whole, largest = model_bytes(build_clip(model_name, device="meta")[0])
    before = rss_bytes()
    # Twice: the first start-up of a process also pays one-time costs (kernels, DTensor and generator set-up);
    # the second measures what scales with the model. The second model is the one trained.
    model, tokenizer, startup = build(model_name, layout, world)
    del model
    gc.collect()
    model, tokenizer, startup_warm = build(model_name, layout, world)
    batch = make_batch(model, tokenizer, batch_size)
    per = batch_size // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    sharding = LAYOUTS[layout](world)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
    routed = model.visual
    if layout == "ddp":
        model, optimizer = accelerator.prepare(model, optimizer)
    clip = clip_grad_norm_ if sharding is not None else torch.nn.utils.clip_grad_norm_
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=rank, world_size=world)

    def step() -> None:
        train_step(model, [local], loss_fn, accelerator, routed, 1.0)
        clip(model.parameters(), 1.0)
        optimizer.step()

    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
    traced = CollectiveBytes()
    with traced:
        step()
    result = {"rank": rank, "step_s": statistics.median(times[2:] or times),
              "startup_peak_rss_above_start_bytes": startup,
              "startup_warm_peak_rss_above_start_bytes": startup_warm,
              "startup_target_bytes": whole // (sharding[0] if sharding else 1) + largest,
              "peak_rss_above_start_bytes": peak_rss_bytes() - before,
              "state_bytes": state_bytes(getattr(model, "module", model), optimizer),
              "collective_bytes": dict(traced.bytes)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()


# glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in the heap, so resident memory would
# hold on to every FSDP2 all-gather / reduce-scatter output ever freed. Served by mmap from 64 KiB and trimmed at
# free, a freed tensor leaves the resident set, and the peak RSS measures the live peak (what a GPU caching
# allocator reports as peak allocated). Measured at the mini size, 2 processes: FSDP2 peak 581 -> 311 MiB.
RSS_TRACKS_LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def launch(model: str, procs: int, layout: str, batch: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
               **RSS_TRACKS_LIVE_MEMORY}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "benchmarks.dist_bench", "--worker", layout, "--model", model, "--batch", str(batch),
               "--steps", str(steps), "--out", tmp]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            errors = [line for line in proc.stderr.splitlines() if "Error" in line]
            raise RuntimeError(f"{layout} at {procs} processes failed:\n" + "\n".join(errors[-10:]))
        ranks = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    return {"layout": layout, "processes": procs, "step_s": max(r["step_s"] for r in ranks),
            "startup_peak_rss_mib": [round(r["startup_peak_rss_above_start_bytes"] / 2**20, 1) for r in ranks],
            "startup_target_mib": round(ranks[0]["startup_target_bytes"] / 2**20, 1),
            "startup_over_target": [round(r["startup_peak_rss_above_start_bytes"] / r["startup_target_bytes"], 3)
                                    for r in ranks],
            "startup_warm_peak_rss_mib": [round(r["startup_warm_peak_rss_above_start_bytes"] / 2**20, 1)
                                          for r in ranks],
            "startup_warm_over_target": [round(r["startup_warm_peak_rss_above_start_bytes"]
                                               / r["startup_target_bytes"], 3) for r in ranks],
            "peak_rss_above_start_mib": [round(r["peak_rss_above_start_bytes"] / 2**20, 1) for r in ranks],
            "expert_state_mib": ranks[0]["state_bytes"]["experts"] / 2**20,
            "rest_state_mib": ranks[0]["state_bytes"]["rest"] / 2**20,
            "collective_mib_per_step": {k: v / 2**20 for k, v in ranks[0]["collective_bytes"].items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SoftMoE-Micro-4-32")
    parser.add_argument("--procs", default="1,2,4")
    parser.add_argument("--batch", type=int, default=16, help="global batch (divisible by every process count)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", help=f"comma-separated subset of {list(LAYOUTS)} (default: all that apply)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/dist_bench.json")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.model, args.worker, args.batch, args.steps, Path(args.out))
        return {}
    load, warning = check_machine()
    chosen = set(args.layouts.split(",")) if args.layouts else set(LAYOUTS)
    rows = [launch(args.model, n, layout, args.batch, args.steps)
            for n in map(int, args.procs.split(",")) for layout in layouts_for(n) if layout in chosen]
    single = next((r for r in rows if r["layout"] == "single"), None)
    for r in rows:
        dp_shard, ep = LAYOUTS[r["layout"]](r["processes"]) or (1, 1)
        split = max(dp_shard, ep) if r["layout"] != "ddp" else 1
        r["experts_split_over"] = split
        if single:
            r["expert_state_vs_single_over_split"] = r["expert_state_mib"] * split / single["expert_state_mib"]
    result = {"model": args.model, "global_batch": args.batch, "steps": args.steps, "load_before": load,
              "load_warning": warning, "rows": rows}
    print(f"{'layout':<10}{'procs':>6}{'step ms':>9}{'expert MiB':>12}{'rest MiB':>10}{'x split/1p':>11}"
          "  peak RSS above start, MiB per process")
    for r in rows:
        print(f"{r['layout']:<10}{r['processes']:>6}{1e3 * r['step_s']:>9.1f}{r['expert_state_mib']:>12.2f}"
              f"{r['rest_state_mib']:>10.2f}{r.get('expert_state_vs_single_over_split', float('nan')):>11.3f}  "
              f"{r['peak_rss_above_start_mib']}")
    print("start-up: peak RSS above start per process (MiB) / target (model / shards + largest parameter); first "
          "start-up of the process, then a second one (no one-time costs)")
    for r in rows:
        print(f"  {r['layout']:<10}{r['processes']:>3}  {r['startup_peak_rss_mib']} / {r['startup_target_mib']}"
              f"  ratio {r['startup_over_target']}; second {r['startup_warm_peak_rss_mib']}"
              f"  ratio {r['startup_warm_over_target']}")
    print("collective payload per step and process (MiB, rank 0):")
    for r in rows:
        print(f"  {r['layout']:<10}{r['processes']:>3}  " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(r["collective_mib_per_step"].items())))
    return write_results(result, "", args.out)


if __name__ == "__main__":
    main()
