"""Sparse upcycling versus training from scratch, on the built-in shapes (Komatsuzaki et al., ICLR 2023).

Run as `python -m benchmarks.upcycle_bench [--steps 150] [--batch 64] [--seeds 0,1]` from the repository root.
Per seed: a dense micro CLIP trains `steps` steps; its image tower seeds a Soft MoE micro tower (`model.upcycle_from`:
experts from the dense MLPs, routers fresh) and its text tower is warm-started (`model.pretrained`, text only);
the upcycled CLIP then trains `steps` more. It is compared with the same Soft MoE CLIP trained from scratch for
`steps` (equal training of the MoE model) and for `2 * steps` (equal total compute, dense phase included), by
held-out zero-shot top-1 on shapes and the mean loss of the last logged steps. Everything goes through
`training.main.fit`, as `mmsoftmoe train` runs it. Writes JSON and a table to `benchmarks/results/`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.common import check_machine, write_results
from mmsoftmoe.machine import describe_machine
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.logger import read_metrics
from mmsoftmoe_training.main import fit

DENSE, MOE = "Dense-Micro-4-32", "SoftMoE-Micro-4-32"


def run(out: Path, seed: int, steps: int, batch: int, *overrides: str) -> dict:
    cfg = load_config("smoke", [f"output_dir={out}", f"seed={seed}", f"steps={steps}", f"batch_size={batch}",
                                "data.num_workers=1", "log_every=10", f"checkpoint_every={steps}", "trackers=[]",
                                "eval.dataset=shapes", "eval.fewshot=false", "optim.warmup_steps=20",
                                "resume=none", *overrides])
    start = time.perf_counter()
    metrics = fit(cfg)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    return {"zeroshot_acc1": metrics["zeroshot/acc1"], "final_loss": statistics.mean(losses[-3:]),
            "seconds": time.perf_counter() - start}


def bench_seed(root: Path, seed: int, steps: int, batch: int) -> dict:
    dense = run(root / f"dense_{seed}", seed, steps, batch, f"model.name={DENSE}")
    dense_final = root / f"dense_{seed}" / "final"
    upcycled = run(root / f"upcycled_{seed}", seed, steps, batch, f"model.name={MOE}",
                   f"model.upcycle_from={dense_final / 'open_clip_model.safetensors'}",
                   f"model.pretrained={dense_final}", "model.pretrained_towers=text")
    scratch = run(root / f"scratch_{seed}", seed, steps, batch, f"model.name={MOE}")
    scratch_2x = run(root / f"scratch2x_{seed}", seed, 2 * steps, batch, f"model.name={MOE}")
    return {"seed": seed, "dense": dense, "upcycled": upcycled, "scratch": scratch, "scratch_2x": scratch_2x}


def summarise(rows: list[dict]) -> dict:
    """Mean of each variant, and paired differences upcycled - scratch (same seed, same data order)."""
    out = {}
    for variant in ("dense", "upcycled", "scratch", "scratch_2x"):
        out[variant] = {k: statistics.mean(r[variant][k] for r in rows) for k in ("zeroshot_acc1", "final_loss")}
    for base in ("scratch", "scratch_2x"):
        diffs = [r["upcycled"]["zeroshot_acc1"] - r[base]["zeroshot_acc1"] for r in rows]
        out[f"upcycled-{base}"] = {"zeroshot_acc1_diff": statistics.mean(diffs), "per_seed": diffs}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", default="benchmarks/results/upcycle_runs")
    parser.add_argument("--out", default="benchmarks/results/upcycle_bench.json")
    args = parser.parse_args(argv)
    load, warning = check_machine()
    rows = [bench_seed(Path(args.work), int(s), args.steps, args.batch) for s in args.seeds.split(",")]
    result = {"steps": args.steps, "batch": args.batch, "machine": describe_machine(), "load_before": load,
              "load_warning": warning, "rows": rows, "summary": summarise(rows)}
    return write_results(result, format_table(result["summary"], args.steps), args.out)


def format_table(summary: dict, steps: int) -> str:
    lines = [f"{'variant':<34}{'zero-shot top-1':>16}{'final loss':>12}"]
    labels = {"dense": f"dense, {steps} steps", "upcycled": f"upcycled, +{steps} steps",
              "scratch": f"Soft MoE scratch, {steps} steps", "scratch_2x": f"Soft MoE scratch, {2 * steps} steps"}
    for variant, label in labels.items():
        s = summary[variant]
        lines.append(f"{label:<34}{s['zeroshot_acc1']:>16.3f}{s['final_loss']:>12.3f}")
    for base in ("scratch", "scratch_2x"):
        d = summary[f"upcycled-{base}"]
        lines.append(f"upcycled - {base}: {d['zeroshot_acc1_diff']:+.3f} zero-shot top-1 (per seed {d['per_seed']})")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
