"""The training stall of a checkpoint save, blocking vs in the background (`checkpoint_async`), in a sharded run.

Runs `torchrun --nproc_per_node N --no-python mmsoftmoe train` twice (FSDP2 + expert parallelism, the Soft MoE Mini
CLIP by default), once with blocking saves and once with `checkpoint_async=true`, every step logged and a checkpoint
every `--every` steps. A save runs after its step's log line, so its stall lands in the next step's time: the table
compares those steps with the others. Writes JSON and a table to `benchmarks/results/`.

    python -m benchmarks.checkpoint_bench --model SoftMoE-Mini-8-64 --nproc 2 --steps 12 --every 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import check_machine, write_results
from mmsoftmoe.machine import describe_machine
from mmsoftmoe_training.logger import read_metrics

MMSOFTMOE = str(Path(sys.executable).parent / "mmsoftmoe")


def train(out: Path, args: argparse.Namespace, background: bool) -> dict[int, float]:
    """Seconds of each step of one run (from the logged throughput)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "--no-python", MMSOFTMOE, "train", "--config", "smoke", f"model.name={args.model}", f"steps={args.steps}",
           f"batch_size={args.batch}", "log_every=1", f"checkpoint_every={args.every}", "eval.dataset=none",
           "data.num_workers=0", "trackers=[]", f"parallel.dp_shard={args.nproc}", f"parallel.ep={args.ep}",
           f"checkpoint_async={str(background).lower()}", f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"training failed:\n{proc.stderr[-3000:]}")
    return {r["step"]: args.batch / r["samples_per_s"] for r in read_metrics(out) if "samples_per_s" in r}


def summarise(seconds: dict[int, float], every: int, steps: int) -> dict:
    """Median time of the steps that follow a save (they carry its stall) and of the others (step 1 excluded)."""
    after_save = [seconds[s + 1] for s in range(every, steps, every) if s + 1 in seconds]
    others = [t for s, t in seconds.items() if s > 1 and (s - 1) % every]
    return {"after_save_s": statistics.median(after_save), "other_s": statistics.median(others),
            "stall_s": statistics.median(after_save) - statistics.median(others), "steps": seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="SoftMoE-Mini-8-64")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/checkpoint_bench.json")
    args = parser.parse_args(argv)
    load, warning = check_machine()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, background in (("blocking", False), ("background", True)):
            rows[name] = summarise(train(Path(tmp) / name, args, background), args.every, args.steps)
    result = {"args": vars(args), "machine": describe_machine(), "load_before": load, "load_warning": warning,
              "rows": rows,
              "stall_ratio_background_over_blocking": rows["background"]["stall_s"] / rows["blocking"]["stall_s"]}
    lines = [f"{'save':<12}{'step after a save (s)':>24}{'other steps (s)':>18}{'stall (s)':>12}"]
    lines += [f"{name:<12}{row['after_save_s']:>24.3f}{row['other_s']:>18.3f}{row['stall_s']:>12.3f}"
              for name, row in rows.items()]
    lines.append(f"stall background / blocking: {result['stall_ratio_background_over_blocking']:.2f}")
    return write_results(result, "\n".join(lines), args.out)

if __name__ == "__main__":
    main()
