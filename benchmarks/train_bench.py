"""Training-loop overhead: mmsoftmoe's optimizer step versus a bare open_clip-style step, same model, same batch.

Run as `python -m benchmarks.train_bench [--models Dense-Micro-4-32,SoftMoE-Micro-4-32] [--batch 32] [--steps 20]`.

"bare" is what open_clip's training loop does per step without its bookkeeping: forward, `open_clip.ClipLoss`,
backward, `AdamW.step`, `zero_grad`. "mmsoftmoe" is one iteration of `training.main.fit`'s loop body on an
in-memory batch: learning-rate schedule, `training.loop.train_step` (accelerate autocast/backward, router aux
losses), the cross-process finiteness check, gradient clipping, the step, and the metrics of `log_every` steps.
Both run in one process, interleaved round by round so machine noise hits both alike; the figure is the ratio
of median step times (target <= 1.05). The machine's load is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator

from benchmarks.layer_bench import load_warning, machine_load
from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import build_clip, preprocess_config
from training.loop import all_finite, build_loss, train_step
from training.main import _step_metrics
from training.optim import build_optimizer, lr_multiplier, set_lr

TARGET_RATIO = 1.05
LOG_EVERY = 10


def make_batch(model, tokenizer, size: int) -> dict:
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_config(model))
    side = preprocess_config(model)["size"][0]
    data = PairDataset(ShapesCaptions(size, image_size=side, seed=0), transform=eval_tf, tokenizer=tokenizer)
    return collate([data[i] for i in range(size)])


def bare_step(model, optimizer, loss_fn, batch) -> None:
    out = model(batch["image"], batch["text"])
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ours_step(accelerator, model, optimizer, loss_fn, batch, step: int) -> None:
    set_lr(optimizer, 5e-4 * lr_multiplier(step, schedule="cosine", total_steps=1000, warmup_steps=10))
    losses = train_step(model, [batch], loss_fn, accelerator, model.visual, 1.0)
    grad_norm = None
    if all_finite(accelerator, sum(losses.values())):
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if step % LOG_EVERY == 0:
        _step_metrics(accelerator, losses, model, optimizer, grad_norm, 0.0)


def bench_model(name: str, batch_size: int, steps: int, warmup: int) -> dict:
    accelerator = Accelerator(cpu=True)
    runs = {}
    for kind in ("bare", "mmsoftmoe"):
        torch.manual_seed(0)
        model, tokenizer = build_clip(name)
        optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
        if kind == "mmsoftmoe":
            model, optimizer = accelerator.prepare(model, optimizer)
        loss_fn = open_clip.ClipLoss() if kind == "bare" else build_loss(
            "clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
        runs[kind] = (model, optimizer, loss_fn, make_batch(model, tokenizer, batch_size))
    times = {"bare": [], "mmsoftmoe": []}
    for step in range(warmup + steps):  # interleaved: noise hits both alike
        for kind, (model, optimizer, loss_fn, batch) in runs.items():
            start = time.perf_counter()
            if kind == "bare":
                bare_step(model, optimizer, loss_fn, batch)
            else:
                ours_step(accelerator, model, optimizer, loss_fn, batch, step)
            if step >= warmup:
                times[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": name, "batch": batch_size, "steps": steps,
            "bare_step_s": med["bare"], "mmsoftmoe_step_s": med["mmsoftmoe"],
            "ratio": med["mmsoftmoe"] / med["bare"], "samples_per_s_mmsoftmoe": batch_size / med["mmsoftmoe"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Dense-Micro-4-32,SoftMoE-Micro-4-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/train_bench.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = machine_load(measure_busy=True)
    if (warning := load_warning(load)):
        print(warning, file=sys.stderr)
    rows = [bench_model(m, args.batch, args.steps, args.warmup) for m in args.models.split(",")]
    result = {"load_before": load, "load_after": machine_load(measure_busy=False), "threads": args.threads,
              "torch": torch.__version__, "target_ratio": TARGET_RATIO, "rows": rows}
    print(f"{'model':<22}{'bare ms':>10}{'ours ms':>10}{'ratio':>8}{'ours samples/s':>16}")
    for r in rows:
        print(f"{r['model']:<22}{1e3 * r['bare_step_s']:>10.1f}{1e3 * r['mmsoftmoe_step_s']:>10.1f}"
              f"{r['ratio']:>8.3f}{r['samples_per_s_mmsoftmoe']:>16.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
