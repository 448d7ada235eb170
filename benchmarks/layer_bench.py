"""Layer benchmark: Soft MoE against the dense MLP, the sparse MoEs and soft-moe-pytorch, fp32 on CPU.

Run as `python -m benchmarks.layer_bench [--settings tiny,s16] [--repeats N] [--threads 2] [--no-thp] [--retain-heap]
[--out F]`.
Issue 2 ("Benchmark") sets the targets; docs/design.md (sections 1, 3 and 6) the layers and the pitfalls.

What is measured, per setting (`s16`: the paper's S/16 MoE layer; `tiny`: a seconds-long smoke size):
- Forward time: eval mode, under `torch.no_grad()`.
- Forward+backward time: train mode, the input requiring grad (as inside a network), backward of a fixed random
  output gradient. Parameter and input gradients are set to None before every step (`zero_grad(set_to_none=True)`,
  the optimizer default), so every step allocates fresh gradients: the case docs/design.md (section 6) warns about.
  Both are medians of `--repeats` calls timed with `time.perf_counter`, after `--warmup` untimed calls; the
  JSON adds the min and the minor page faults per call (fresh memory is what the CPU pays for, not only FLOPs).
- GFLOP/s from the FLOP counts the layers declare (`flops_per_example`, tested against `FlopCounterMode`): 2 per
  multiply-add, matmuls only (biases, GELU, softmax ignored). Dense 4bmdh; Soft MoE b(6mds + 4sdh) with s = n*p
  slots (logits, dispatch, combine, experts); sparse 2bmdn for the router plus 4dh per expert-buffer row
  processed (b groups x n experts x capacity C, vmoe's capacity rounding, empty buffer positions included: they are
  computed). Backward counts as 2x forward.
- % of peak: against the best-of-5 fp32 `torch.mm` of two `--peak-size` squares, measured in the same run with
  the same threads (a `torch.bmm` of the expert shape is reported beside it).
- Peak memory of one forward (no grad; and with grad, output and autograd graph alive): the peak of bytes live
  in torch's CPU allocator during the call above those live before it, from torch.profiler's allocation events
  (tensor bytes, not RSS: parameters and input are excluded, and glibc's caching does not count). The issue's
  bound for Soft MoE is the dense MLP's peak plus the three (b, m, s) float32 routing tensors (logits, dispatch,
  combine weights).
- Machine state: load average and a one-second CPU busy fraction before the run (a loud warning when the machine
  is busy: two contended cores make timings meaningless), load after, threads, torch version, THP flag; and for
  every timing the share of the CPU that other processes took meanwhile (/proc/stat minus this process's own
  time), flagged in the table above 0.1.

Allocation: fresh memory costs page faults (and the kernel zeroing it), and a Soft MoE training step at S/16 gets
about 600 MiB of fresh expert-weight gradients. torch's CPU allocator backs large allocations with transparent huge
pages when `THP_MEM_ALLOC_ENABLE=1` is in the environment when torch starts (on by default here, `--no-thp` off);
`--retain-heap` also has glibc serve every allocation from a heap it never trims (`MALLOC_MMAP_MAX_=0`,
`MALLOC_TRIM_THRESHOLD_=2**40`), so freed memory is reused without faults. Run as a script, this module re-executes
itself with these variables as asked; called in-process (`main([...])`), it records whatever the environment held.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    CONTENDED,
    check_machine,
    cpu_fractions,
    cpu_sample,
    peak_alloc_bytes,
    time_median,
    write_results,
)
from mmsoftmoe.layers import DenseMLP, ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

THP_ENV = "THP_MEM_ALLOC_ENABLE"
RETAIN_TRIM_THRESHOLD = str(2**40)  # glibc never returns freed heap memory to the kernel
FWD_BWD_FLOP_FACTOR = 3  # forward + backward = forward + 2x forward
FP32_BYTES = 4
ROUTING_TENSORS = 3  # (b, m, s) logits, dispatch and combine weights
LUCIDRAINS = "lucidrains"
TARGET_PCT_PEAK = 70.0
TARGET_SPEEDUP_VS_LUCIDRAINS = 1.3


@dataclass(frozen=True)
class Setting:
    """One layer shape: width d, tokens m, experts n, slots per expert p, expert (and dense) width h, batch b."""

    name: str
    d: int
    m: int
    n: int
    p: int
    h: int
    batch: int

    @property
    def slots(self) -> int:
        return self.n * self.p


SETTINGS = {
    "tiny": Setting("tiny", d=64, m=64, n=8, p=4, h=256, batch=32),
    "s16": Setting("s16", d=384, m=196, n=128, p=1, h=1536, batch=32),
}


def declared_flops(build: Callable[[Setting], nn.Module]) -> Callable[[Setting], int]:
    """Forward FLOPs at a setting as the layer declares them (`flops_per_example`: 2 per multiply-add, matmuls
    only), read from a copy built on the meta device (no memory)."""
    def flops(s: Setting) -> int:
        with torch.device("meta"):
            layer = build(s)
        return s.batch * layer.flops_per_example(s.m)

    return flops


@dataclass(frozen=True)
class LayerSpec:
    name: str
    build: Callable[[Setting], nn.Module]
    flops: Callable[[Setting], int]


def build_lucidrains(s: Setting) -> nn.Module:
    """soft-moe-pytorch's SoftMoE at the same d, n, p and expert width h (its `expert_mult` = h / d).

    `num_slots` (slots per expert) is given instead of `seq_len` (the two are exclusive; seq_len would set
    p = m // n); its per-forward expert offloading is off, as it is a no-op on one CPU device.
    """
    from soft_moe_pytorch import SoftMoE as LucidrainsSoftMoE

    if s.h % s.d:
        raise ValueError(f"soft-moe-pytorch needs an expert width h that is a multiple of d, got h={s.h}, d={s.d}")
    return LucidrainsSoftMoE(s.d, num_experts=s.n, num_slots=s.p, expert_mult=s.h // s.d,
                             offload_unused_experts_to_cpu=False)


def _soft_moe(s: Setting) -> nn.Module:
    return SoftMoE(s.d, s.h, num_experts=s.n, slots_per_expert=s.p)


def layer_specs(with_lucidrains: bool) -> list[LayerSpec]:
    """Soft MoE (ours), dense MLP, Tokens Choice (k 1, cf 1), Experts Choice (cf 1), soft-moe-pytorch."""
    builds = {
        "soft_moe": _soft_moe,
        "dense": lambda s: DenseMLP(s.d, s.h),
        "tokens_choice": lambda s: TokensChoiceMoE(s.d, s.h, num_experts=s.n, top_k=1, capacity_factor=1.0),
        "experts_choice": lambda s: ExpertsChoiceMoE(s.d, s.h, num_experts=s.n, capacity_factor=1.0),
    }
    specs = [LayerSpec(name, build, declared_flops(build)) for name, build in builds.items()]
    if with_lucidrains:  # the same computation as ours, so our count
        specs.append(LayerSpec(LUCIDRAINS, build_lucidrains, declared_flops(_soft_moe)))
    return specs


def lucidrains_available() -> bool:
    try:
        import soft_moe_pytorch  # noqa: F401
    except ImportError:
        print("skipping soft-moe-pytorch: not importable (install the benchmark extra: pip install -e '.[bench]')",
              file=sys.stderr)
        return False
    return True


# Measurements.
def peak_gemm_gflops(fn: Callable[[], object], flops: int, tries: int = 5) -> float:
    """Best-of-`tries` GFLOP/s of a GEMM call (after one warm-up)."""
    return flops / time_median(fn, tries, warmup=1)["min_s"] / 1e9


def measure_peak(s: Setting, size: int) -> dict[str, float]:
    """fp32 `torch.mm` of `size` squares, and `torch.bmm` of the expert shape (n, b*p, d) @ (n, d, h)."""
    a, b, c = torch.randn(size, size), torch.randn(size, size), torch.empty(size, size)
    xe, we, ye = torch.randn(s.n, s.batch * s.p, s.d), torch.randn(s.n, s.d, s.h), torch.empty(s.n, s.batch * s.p, s.h)
    before = cpu_sample()
    return {
        "mm_size": size,
        "mm_gflops": peak_gemm_gflops(lambda: torch.mm(a, b, out=c), 2 * size**3),
        "bmm_expert_gflops": peak_gemm_gflops(lambda: torch.bmm(xe, we, out=ye), 2 * s.n * s.batch * s.p * s.d * s.h),
        "others_cpu_fraction": cpu_fractions(before, cpu_sample())["others"],
    }


def forward_no_grad(layer: nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)
    return run


def forward_backward(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> Callable[[], None]:
    """One training step's layer work; gradients set to None first, so each step allocates them afresh."""
    def run() -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
    return run


def bench_layer(spec: LayerSpec, s: Setting, repeats: int, warmup: int, peak_gflops: float) -> dict:
    """Times, GFLOP/s, % of peak and peak forward memory of one layer at one setting."""
    torch.manual_seed(0)
    layer = spec.build(s)
    x = torch.randn(s.batch, s.m, s.d)
    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn(s.batch, s.m, s.d)
    flops = spec.flops(s)
    layer.eval()
    fwd = time_median(forward_no_grad(layer, x), repeats, warmup)
    mem_no_grad = peak_alloc_bytes(forward_no_grad(layer, x))
    layer.train()
    fwd_bwd = time_median(forward_backward(layer, x_grad, grad_out), repeats, warmup)
    mem_grad = peak_alloc_bytes(lambda: layer(x_grad))
    result = {"forward_gflop": flops / 1e9, "params": sum(p.numel() for p in layer.parameters()),
              "forward": fwd, "forward_backward": fwd_bwd,
              "peak_forward_bytes_no_grad": mem_no_grad, "peak_forward_bytes_grad": mem_grad}
    for key, factor in (("forward", 1), ("forward_backward", FWD_BWD_FLOP_FACTOR)):
        gflops = factor * flops / result[key]["median_s"] / 1e9
        result[key] |= {"gflops": gflops, "pct_peak": 100.0 * gflops / peak_gflops}
    return result


# Summaries.
def ratios(layers: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Soft MoE's time over each other layer's (< 1: Soft MoE is faster), forward and forward+backward."""
    ours = layers["soft_moe"]
    return {f"soft_moe/{name}": {k: ours[k]["median_s"] / other[k]["median_s"] for k in ("forward", "forward_backward")}
            for name, other in layers.items() if name != "soft_moe"}


def memory_bound(s: Setting, layers: dict[str, dict]) -> dict[str, dict]:
    """Soft MoE's forward peak against dense peak + the (b, m, s) routing tensors, without and with grad."""
    extra = ROUTING_TENSORS * s.batch * s.m * s.slots * FP32_BYTES
    out = {}
    for mode in ("no_grad", "grad"):
        key = f"peak_forward_bytes_{mode}"
        bound = layers["dense"][key] + extra
        out[mode] = {"soft_moe_bytes": layers["soft_moe"][key], "bound_bytes": bound,
                     "within": layers["soft_moe"][key] <= bound}
    return out


def targets(layers: dict[str, dict], bound: dict[str, dict]) -> dict[str, dict]:
    """The issue's three targets, with the value reached and whether it is met."""
    pct = layers["soft_moe"]["forward_backward"]["pct_peak"]
    out = {"soft_moe_fwd_bwd_pct_peak>=70": {"value": pct, "met": pct >= TARGET_PCT_PEAK},
           "soft_moe_forward_peak_memory_within_bound": {
               "value": {mode: b["soft_moe_bytes"] / b["bound_bytes"] for mode, b in bound.items()},
               "met": all(b["within"] for b in bound.values())}}
    if LUCIDRAINS in layers:
        theirs, ours = (layers[k]["forward_backward"]["median_s"] for k in (LUCIDRAINS, "soft_moe"))
        speedup = theirs / ours
        out["fwd_bwd_speedup_vs_lucidrains>=1.3"] = {"value": speedup, "met": speedup >= TARGET_SPEEDUP_VS_LUCIDRAINS}
    return out


def worst_others(*timings: dict) -> float | None:
    values = [t["others_cpu_fraction"] for t in timings if t["others_cpu_fraction"] is not None]
    return max(values) if values else None


def format_others(*timings: dict) -> str:
    worst = worst_others(*timings)
    return "-" if worst is None else f"{worst:.2f}" + ("!" if worst > CONTENDED else "")


def all_timings(results: dict[str, dict]) -> list[dict]:
    """Every timing record of a run (peaks and layers), for the contention summary."""
    out = []
    for result in results.values():
        out.append(result["peak"])
        out.extend(r[k] for r in result["layers"].values() for k in ("forward", "forward_backward"))
    return out


def format_table(name: str, s: Setting, result: dict) -> str:
    """A readable table of one setting's layers, then its ratios and targets."""
    peak = result["peak"]
    lines = [f"\n[{name}] d={s.d} m={s.m} n={s.n} p={s.p} h={s.h} b={s.batch} | peak: mm{peak['mm_size']} "
             f"{peak['mm_gflops']:.1f} GFLOP/s, expert bmm {peak['bmm_expert_gflops']:.1f} GFLOP/s "
             f"(others {format_others(peak)})",
             f"{'layer':<15}{'GFLOP':>7}{'fwd ms':>9}{'GFLOP/s':>9}{'%peak':>7}{'f+b ms':>9}{'GFLOP/s':>9}"
             f"{'%peak':>7}{'mem MiB':>9}{'+grad':>8}{'kfaults f/f+b':>15}{'others':>7}"]
    for layer, r in result["layers"].items():
        f, fb = r["forward"], r["forward_backward"]
        lines.append(f"{layer:<15}{r['forward_gflop']:>7.2f}{1e3 * f['median_s']:>9.2f}{f['gflops']:>9.1f}"
                     f"{f['pct_peak']:>7.1f}{1e3 * fb['median_s']:>9.2f}{fb['gflops']:>9.1f}{fb['pct_peak']:>7.1f}"
                     f"{r['peak_forward_bytes_no_grad'] / 2**20:>9.1f}{r['peak_forward_bytes_grad'] / 2**20:>8.1f}"
                     f"{f['minor_faults_per_call'] / 1e3:>8.1f}/{fb['minor_faults_per_call'] / 1e3:<6.1f}"
                     f"{format_others(f, fb):>7}")
    for key, r in result["ratios"].items():
        lines.append(f"time {key}: forward {r['forward']:.2f}, forward+backward {r['forward_backward']:.2f}")
    for key, t in result["targets"].items():
        lines.append(f"target {key}: {'MET' if t['met'] else 'MISSED'} ({t['value']})")
    lines.append(f"others: share of all CPUs other processes used while timing (! above {CONTENDED}: do not trust)")
    return "\n".join(lines)


def run_setting(s: Setting, specs: list[LayerSpec], repeats: int, warmup: int, peak_size: int) -> dict:
    peak = measure_peak(s, peak_size)
    layers = {}
    for spec in specs:
        print(f"[{s.name}] {spec.name} ...", file=sys.stderr, flush=True)
        layers[spec.name] = bench_layer(spec, s, repeats, warmup, peak["mm_gflops"])
    bound = memory_bound(s, layers)
    return {"config": asdict(s), "peak": peak, "layers": layers, "ratios": ratios(layers),
            "memory_bound": bound, "targets": targets(layers, bound)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--settings", default="tiny,s16", help=f"comma-separated, from {sorted(SETTINGS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square fp32 mm for the peak")
    parser.add_argument("--no-thp", action="store_true", help=f"run without {THP_ENV}=1 (re-executes as needed)")
    parser.add_argument("--retain-heap", action="store_true",
                        help="glibc serves every allocation from a heap it never trims (MALLOC_MMAP_MAX_=0), so "
                             "freed memory is reused without page faults (re-executes as needed)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/layer_bench.json"))
    args = parser.parse_args(argv)
    unknown = sorted(set(args.settings.split(",")) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; choose from {sorted(SETTINGS)}")
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the JSON report and the tables, write the report and return it."""
    args = parse_args(argv)
    load, warning = check_machine()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        specs = layer_specs(lucidrains_available())
        results = {name: run_setting(SETTINGS[name], specs, args.repeats, args.warmup, args.peak_size)
                   for name in args.settings.split(",")}
    finally:
        torch.set_num_threads(previous_threads)
    meta = {"torch_version": torch.__version__, "threads": args.threads, "thp": os.environ.get(THP_ENV) == "1",
            "retain_heap": os.environ.get("MALLOC_MMAP_MAX_") == "0",
            "repeats": args.repeats, "warmup": args.warmup, "grad_reset": "set_to_none", "dtype": "float32",
            "load_before": load, "load_warning": warning,
            "max_others_cpu_fraction": worst_others(*all_timings(results))}
    table = "\n".join(format_table(name, SETTINGS[name], result) for name, result in results.items())
    table += f"\n\nthreads {args.threads}, THP {'on' if meta['thp'] else 'off'}, retain-heap {meta['retain_heap']}"
    if (meta["max_others_cpu_fraction"] or 0.0) > CONTENDED:
        print(f"WARNING: other processes took up to {meta['max_others_cpu_fraction']:.0%} of the CPU while timing: "
              "the flagged figures measure the contention, not the layers", file=sys.stderr)
    return write_results({"meta": meta, "settings": results}, table, args.out, meta=meta)


def allocator_env(argv: list[str]) -> dict[str, str | None]:
    """The allocator variables a command line asks for (None: unset)."""
    retain = "--retain-heap" in argv
    return {THP_ENV: None if "--no-thp" in argv else "1",
            "MALLOC_MMAP_MAX_": "0" if retain else None,
            "MALLOC_TRIM_THRESHOLD_": RETAIN_TRIM_THRESHOLD if retain else None}


def reexec_with_allocator_env(argv: list[str]) -> None:
    """Re-execute this script unless the allocator variables are as asked: torch and glibc read them at start-up."""
    want = allocator_env(argv)
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    env = {k: v for k, v in os.environ.items() if k not in want}
    env |= {k: v for k, v in want.items() if v is not None}
    target = ["-m", __spec__.name] if __spec__ is not None else [sys.argv[0]]
    os.execve(sys.executable, [sys.executable, *target, *argv], env)


if __name__ == "__main__":
    reexec_with_allocator_env(sys.argv[1:])
    main()
