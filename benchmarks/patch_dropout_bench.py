"""FLIP patch dropout (`model.patch_dropout`) on the demo model: training speed and zero-shot accuracy at 0 and 0.5.

Run as `python -m benchmarks.patch_dropout_bench [--rates 0,0.5] [--steps 150] [--batch 64] [--rounds 10]`.

Two measurements, both in this one process:
- speed: the training step (`training.loop.optimizer_step`: forward, open_clip's ClipLoss, backward, AdamW) of the
  demo config's model at each rate on one in-memory batch, interleaved round by round so machine noise hits every
  rate alike; the figure is samples/s from the median step time, and the speed-up is relative to rate 0.
- quality: a short run of the demo config (`mmsoftmoe train --config demo`, `--steps` steps, data and seed
  equal) at each rate, then its zero-shot top-1 on the held-out shapes split, in evaluation mode (no dropout).
The machine's load is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from benchmarks.layer_bench import check_machine, machine_load
from benchmarks.train_bench import make_batch
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.loop import build_loss, optimizer_step
from mmsoftmoe_training.main import build_model, fit
from mmsoftmoe_training.optim import build_optimizer


def step_times(rates: list[float], batch_size: int, rounds: int, warmup: int = 3) -> dict[float, float]:
    """Median seconds of one training step at each patch-dropout rate (steps interleaved over the rates)."""
    accelerator = Accelerator(cpu=True)
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    setups, times = {}, {rate: [] for rate in rates}
    for rate in rates:
        model = build_model(load_config("demo", [f"model.patch_dropout={rate}"]))[0].train()
        setups[rate] = (model, build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6))
    batch = make_batch(setups[rates[0]][0], build_model(load_config("demo"))[1], batch_size)
    for i in range(warmup + rounds):
        for rate, (model, optimizer) in setups.items():
            start = time.perf_counter()
            optimizer_step(model, optimizer, [batch], loss_fn=loss_fn, accelerator=accelerator,
                           routed_model=model.visual, aux_weight=1.0, lr=1e-3, grad_clip=1.0)
            if i >= warmup:
                times[rate].append(time.perf_counter() - start)
    return {rate: statistics.median(values) for rate, values in times.items()}


def zero_shot(rate: float, steps: int, out: Path) -> dict[str, float]:
    """Zero-shot metrics of a short demo run at `rate` (evaluated without dropout)."""
    cfg = load_config("demo", [f"model.patch_dropout={rate}", f"steps={steps}", f"output_dir={out}", "trackers=[]",
                               "eval.every=0", "eval.fewshot=false", f"checkpoint_every={steps}"])
    start = time.perf_counter()
    metrics = fit(cfg, desc=f"patch_dropout={rate}")
    return {"zeroshot_acc1": metrics["zeroshot/acc1"], "run_seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="0,0.5")
    parser.add_argument("--steps", type=int, default=150, help="training steps of each quality run")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/patch_dropout_bench.json")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    load, _ = check_machine()
    torch.manual_seed(0)
    seconds = step_times(rates, args.batch, args.rounds)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rate in rates:
            quality = zero_shot(rate, args.steps, Path(tmp) / f"rate_{rate}")
            rows.append({"patch_dropout": rate, "step_s": seconds[rate], "samples_per_s": args.batch / seconds[rate],
                         "speedup_vs_0": seconds[rates[0]] / seconds[rate], **quality})
    result = {"model": load_config("demo").model.name, "batch": args.batch, "rounds": args.rounds,
              "quality_steps": args.steps, "rows": rows, "load_before": load,
              "load_after": machine_load(measure_busy=False)}
    print(f"{'patch_dropout':>13}{'step ms':>10}{'samples/s':>11}{'speed-up':>10}{'zero-shot top-1':>17}")
    for r in rows:
        print(f"{r['patch_dropout']:>13}{1e3 * r['step_s']:>10.1f}{r['samples_per_s']:>11.1f}"
              f"{r['speedup_vs_0']:>10.2f}{r['zeroshot_acc1']:>17.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
