"""What machine a figure came from: cores, threads, processor, and the measured dense GEMM peak.

Timing figures travel between machines only relative to something measured on each; the peak throughput of a
square `torch.mm` (fp32 on CPU, 2048^2 by default) is that reference. Measured here, 2-core machines of one kind
ranged from ~120 to ~410 GFLOP/s, so a throughput is reported with the peak of the machine it ran on.
"""

from __future__ import annotations

import os
import platform
import time

import torch


def _synchronize(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def gemm_peak_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     tries: int = 5) -> float:
    """Best-of-`tries` throughput of a `size` x `size` matrix product, in GFLOP/s (2 * size^3 FLOPs each)."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best = float("inf")
    for _ in range(tries):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(peak_gflops: float | None = None) -> dict:
    """Cores, torch threads, processor and fp32 GEMM peak (measured unless given): what a timing must name."""
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_name(),
            "gemm_peak_gflops_fp32": round(peak_gflops if peak_gflops is not None else gemm_peak_gflops(), 1)}
