"""The device suite's runner: each part in a forked process within its share of the budget, then the report
(`benchmarks.gpu_suite.report`) written as JSON and markdown. `main` is `python -m benchmarks.gpu_suite`."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from benchmarks.common import check_machine, machine_load
from benchmarks.gpu_suite.parts import GPU, PARTS, PARTS_ORDER, SMOKE, Part, Recorder, Sizes
from benchmarks.gpu_suite.report import derive, markdown

MIN_PART_S = 5.0  # a part is not started with less time than this left
KILL_MARGIN_S = 2.0  # a part stops starting rows this long before it would be killed


# The orchestrator: parts in forked processes, budgets, derived figures, report.
def part_process(name: str, sizes: Sizes, path: Path, deadline: float) -> None:
    """Entry point of a part's process (its own process group, so a kill also ends compile workers)."""
    os.setpgid(0, 0)
    gc.freeze()  # what the parent holds is never garbage here; the rows' collections then take no time
    recorder = Recorder(name, path, deadline)
    recorder.save()
    AcceleratorState._reset_state(True)  # a fork inherits the parent's state (another precision, if it made one)
    accelerator = Accelerator(cpu=sizes.cpu, mixed_precision="bf16")
    PARTS[name](Part(sizes, accelerator, recorder))
    recorder.save()


def kill_group(process: multiprocessing.process.BaseProcess) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # it had not made its group yet
        process.kill()
    process.join()


def run_part(name: str, sizes: Sizes, path: Path, timeout_s: float) -> dict:
    """Run one part in a forked process for at most `timeout_s`; its recorded rows, with a note if it was killed
    or failed."""
    path.unlink(missing_ok=True)
    # fork: no re-import, so a part starts in a moment; spawn if CUDA was initialised here after all.
    ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    process = ctx.Process(target=part_process, args=(name, sizes, path, time.time() + timeout_s - KILL_MARGIN_S))
    start = time.perf_counter()
    process.start()
    try:
        process.join(timeout_s)
    finally:  # also on Ctrl-C: a part in its own process group would outlive this one
        killed = process.is_alive()
        if killed:
            kill_group(process)
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}, "skipped": {}, "errors": {}}
    data["elapsed_s"] = time.perf_counter() - start
    data["budget_s"] = timeout_s
    if killed:
        data["killed"] = f"killed at its {timeout_s:.0f} s budget while measuring {data.get('current')}"
    elif process.exitcode:
        data["failed"] = f"part process exited with code {process.exitcode} while measuring {data.get('current')}"
    return data


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def run_parts(names: list[str], sizes: Sizes, out: Path, total_s: float, overrides: dict[str, float]) -> dict:
    """Every asked part within the total budget: its share, plus what earlier parts left unused."""
    parts_dir = out / "parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    for stale in parts_dir.glob("*.json"):  # an earlier run's parts never mix with this one's
        stale.unlink()
    end, carry, parts = time.perf_counter() + total_s, 0.0, {}
    for name in names:
        share = overrides.get(name, sizes.budgets[name]) + carry
        timeout = min(share, end - time.perf_counter())
        if timeout < MIN_PART_S:
            parts[name] = {"rows": {}, "skipped": {}, "errors": {},
                           "not_run": f"budget: {max(timeout, 0):.0f} s of the {total_s:.0f} s total left"}
            continue
        print(f"[gpu_suite] part {name}: at most {timeout:.0f} s", file=sys.stderr, flush=True)
        parts[name] = run_part(name, sizes, parts_dir / f"{name}.json", timeout)
        carry = max(0.0, share - parts[name]["elapsed_s"])
    return parts



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    suite_doc = sys.modules["benchmarks.gpu_suite"].__doc__  # the package says what the suite measures
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=suite_doc.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU: the code paths, in seconds")
    parser.add_argument("--parts", default=",".join(PARTS_ORDER), help=f"comma-separated, from {PARTS_ORDER}")
    parser.add_argument("--budget-s", type=float, default=None, help="total seconds (default: 450 on GPU)")
    parser.add_argument("--part-budget", action="append", default=[], metavar="PART=SECONDS",
                        help="override one part's share of the budget (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for gpu_suite.json, gpu_suite.md and parts/ (default benchmarks/results/"
                             "gpu_suite, or gpu_suite_smoke with --cpu-smoke)")
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(args.parts) - set(PARTS_ORDER))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {list(PARTS_ORDER)}")
    try:
        args.part_budget = {k: float(v) for k, v in (item.split("=", 1) for item in args.part_budget)}
    except ValueError:
        parser.error("--part-budget takes PART=SECONDS, e.g. --part-budget clip=200")
    if set(args.part_budget) - set(PARTS_ORDER):
        parser.error(f"--part-budget: unknown parts {sorted(set(args.part_budget) - set(PARTS_ORDER))}")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Run the suite; write and return the report (None, having said why, when there is no GPU to measure)."""
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("gpu_suite: no CUDA GPU visible to torch; nothing measured (--cpu-smoke runs the code paths on CPU)",
              file=sys.stderr)
        return None
    sizes = SMOKE if args.cpu_smoke else GPU
    out = args.out or Path("benchmarks/results") / ("gpu_suite_smoke" if args.cpu_smoke else "gpu_suite")
    total = sizes.total_budget_s if args.budget_s is None else args.budget_s
    names = [p for p in PARTS_ORDER if p in args.parts]
    load_before, warning = check_machine()
    start = time.perf_counter()
    parts = run_parts(names, sizes, out, total, args.part_budget)
    device = parts.get("peak", {}).get("device", {})
    report = {"meta": {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "sizes": sizes.name, "torch": torch.__version__, "cuda": device.get("cuda", torch.version.cuda),
                       "device_name": device.get("device_name"), "device": device, "commit": git_commit(),
                       "budget_s": total, "elapsed_s": time.perf_counter() - start, "parts": names,
                       "steps": sizes.steps, "warmup": sizes.warmup, "compile_backend": sizes.compile_backend,
                       "load_before": load_before, "load_warning": warning,
                       "load_after": machine_load(measure_busy=False)},
              "parts": parts}
    derive(report, sizes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (out / "gpu_suite.md").write_text(text)
    print(text)
    print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
