"""What every benchmark shares: the machine's load around a run, one median timer, peak allocator memory, and the
result files (JSON written to `--out`, printed with a table).

The machine is often shared, so each benchmark records the load before (with a one-second CPU busy measurement) and
after its run, warns on stderr when the machine is busy, and the timer records the share of the CPU other processes
took while it timed (above `CONTENDED` a timing measures contention, not the code).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MIN_CPU_WINDOW_S = 0.2  # CPU seconds (all cores) below which /proc/stat's 10 ms ticks say nothing
CONTENDED = 0.1  # share of the machine's CPU taken by other processes above which a timing is flagged


# Machine state.
@dataclass(frozen=True)
class CpuSample:
    """All CPUs' total and idle time (/proc/stat) and this process's own CPU time, in seconds."""

    total_s: float
    idle_s: float
    own_s: float


def cpu_sample() -> CpuSample | None:
    """None where /proc/stat does not exist."""
    try:
        line = Path("/proc/stat").read_text().split("\n", 1)[0]
    except OSError:
        return None
    ticks = [int(v) for v in line.split()[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return CpuSample(sum(ticks) / hz, (ticks[3] + ticks[4]) / hz, own.user + own.system)


def cpu_fractions(a: CpuSample | None, b: CpuSample | None) -> dict[str, float | None]:
    """Between two samples: fraction of all CPUs busy, and busy with processes other than this one."""
    if a is None or b is None or b.total_s - a.total_s < MIN_CPU_WINDOW_S:
        return {"busy": None, "others": None}
    total = b.total_s - a.total_s
    busy = total - (b.idle_s - a.idle_s)
    others = busy - (b.own_s - a.own_s)
    return {"busy": min(1.0, max(0.0, busy / total)), "others": min(1.0, max(0.0, others / total))}


def cpu_busy_fraction(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy over the next `seconds` (while this process sleeps)."""
    before = cpu_sample()
    time.sleep(seconds)
    return cpu_fractions(before, cpu_sample())["busy"]


def machine_load(measure_busy: bool) -> dict:
    """Load averages, usable cores and (optionally) the CPU busy fraction over the next second."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    load = {"loadavg_1_5_15": list(os.getloadavg()), "cores": cores}
    if measure_busy:
        load["cpu_busy_fraction_1s"] = cpu_busy_fraction()
    return load


def load_warning(load: dict) -> str | None:
    """A warning if the machine is busy: by the measured CPU busy fraction when there is one (the load average
    lags by a minute and still counts a benchmark that just ended), else by the 1-minute load average."""
    busy = load.get("cpu_busy_fraction_1s")
    if (busy > 0.5) if busy is not None else (load["loadavg_1_5_15"][0] > 0.5 * load["cores"]):
        return (f"MACHINE IS BUSY (1-min load {load['loadavg_1_5_15'][0]:.2f} on {load['cores']} cores, "
                f"CPU busy {busy if busy is None else round(busy, 2)}): timings beside another busy process are "
                "meaningless")
    return None


def check_machine() -> tuple[dict, str | None]:
    """Load before a benchmark (with a one-second busy measurement) and the warning, if any (also on stderr); a
    report keeps them as `load_before` and `load_warning`, and `write_results` adds `load_after`."""
    load = machine_load(measure_busy=True)
    warning = load_warning(load)
    if warning:
        print(f"WARNING: {warning}", file=sys.stderr)
    return load, warning


# Measurements.
def synchronize(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a wall-clock time covers it."""
    if device is not None and torch.device(device).type != "cpu":
        torch.accelerator.synchronize(device)


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_median(fn: Callable[[], object], repeats: int, warmup: int,
                device: torch.device | str | None = None) -> dict[str, float | None]:
    """Median and min seconds of `repeats` calls after `warmup` untimed ones, each followed by a synchronisation of
    `device` (None: CPU work only); page faults per call; and the fraction of the machine's CPU that other processes
    used meanwhile (above `CONTENDED` the times are not to be trusted)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    faults_before, cpu_before = minor_faults(), cpu_sample()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    faults = (minor_faults() - faults_before) / repeats
    others = cpu_fractions(cpu_before, cpu_sample())["others"]
    return {"median_s": statistics.median(times), "min_s": min(times), "minor_faults_per_call": faults,
            "others_cpu_fraction": others}


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes live in torch's CPU allocator during `fn()` above those live before it (profiler events)."""
    gc.collect()
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # kineto's "no GPU found" error on CPU-only profiling is noise
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = prof.profiler.kineto_results.events()
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in deltas:
        live += nbytes
        peak = max(peak, live)
    return peak


# Result files.
def write_results(report: dict, table: str, out: Path | str, meta: dict | None = None) -> dict:
    """The tail every benchmark shares: the load after the run joins `meta` (the report itself by default, which
    holds `load_before` and `load_warning`), the JSON report and then the table (if any: a benchmark may have
    printed its own) go to stdout, the JSON to `out`."""
    meta = report if meta is None else meta
    meta["load_after"] = machine_load(measure_busy=False)
    text = json.dumps(report, indent=2)
    print(text)
    if table:
        print(table)
    print(f"load before {meta['load_before']['loadavg_1_5_15']}, after {meta['load_after']['loadavg_1_5_15']} "
          f"({meta['load_after']['cores']} cores){'; ' + meta['load_warning'] if meta.get('load_warning') else ''}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return report
