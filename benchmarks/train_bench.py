"""Training-loop overhead: mmsoftmoe's optimizer step versus a bare open_clip-style step, same model, same batch.

Run as `python -m benchmarks.train_bench [--models Dense-Micro-4-32,SoftMoE-Micro-4-32] [--batch 32] [--steps 20]
[--compile]`.

"bare" is what open_clip's training loop does per step without its bookkeeping: forward, `open_clip.ClipLoss`,
backward, `AdamW.step`, `zero_grad`. "mmsoftmoe" is what `training.main.fit` runs per step, on an in-memory
batch: `training.loop.optimizer_step` (learning rate, accelerate autocast/backward, router aux losses, the
cross-process finiteness check, gradient clipping (also measured without it, as the bare step has none), the
update) and `training.loop.step_metrics` every `log_every` steps.
Both run in one process, interleaved round by round so machine noise hits both alike; the figure is the ratio
of median step times (target <= 1.05). `--compile` adds "mmsoftmoe_compiled", the same step with the model under
`torch.compile` (inductor, as `fit` with `model.compile=true`; compiled during the warm-up steps, which include a
logging step so both routing-statistics variants are compiled before timing), and reports compiled/eager step time
(`compile_ratio`, < 1 is a speed-up). The step's FLOPs are counted (`FlopCounterMode`) and stated as GFLOP/s and
a fraction of the peak fp32 GEMM throughput measured in the same run. The machine's load is recorded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import open_clip
import torch
from accelerate import Accelerator

from benchmarks.common import check_machine, write_results
from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, transforms_from_preprocess_cfg
from mmsoftmoe.layers import set_record_stats
from mmsoftmoe.machine import gemm_peak_gflops
from mmsoftmoe.models.accounting import count_flops
from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_training.loop import build_loss, optimizer_step, step_metrics
from mmsoftmoe_training.optim import build_optimizer, lr_multiplier

TARGET_RATIO = 1.05
# Step kinds, with the gradient-clipping norm of the mmsoftmoe loop (bare open_clip-style steps do not clip).
KINDS = {"bare": None, "mmsoftmoe": 1.0, "mmsoftmoe_noclip": None}
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


def ours_step(accelerator, model, optimizer, loss_fn, batch, step: int, grad_clip: float | None) -> None:
    """What `fit` does per step: the shared `optimizer_step`, and the metrics on logged steps."""
    unwrapped = getattr(model, "_orig_mod", model)  # under torch.compile, as fit's `unwrapped`
    set_record_stats(unwrapped, step % LOG_EVERY == 0)  # as fit: routing statistics on logged steps only
    lr = 5e-4 * lr_multiplier(step, schedule="cosine", total_steps=1000, warmup_steps=10)
    result = optimizer_step(model, optimizer, [batch], loss_fn=loss_fn, accelerator=accelerator,
                            routed_model=unwrapped.visual, aux_weight=1.0, lr=lr, grad_clip=grad_clip)
    if step % LOG_EVERY == 0:
        step_metrics(accelerator, result, unwrapped, optimizer, 0.0)


def bench_model(name: str, batch_size: int, steps: int, warmup: int, compile_: bool = False) -> dict:
    accelerator = Accelerator(cpu=True)
    kinds = KINDS | ({"mmsoftmoe_compiled": KINDS["mmsoftmoe"]} if compile_ else {})
    runs = {}
    for kind in kinds:
        torch.manual_seed(0)
        model, tokenizer = build_clip(name)
        set_record_stats(model, False)  # the bare step computes no routing statistics
        optimizer = build_optimizer(model, lr=5e-4, weight_decay=0.2, betas=(0.9, 0.98), eps=1e-6)
        if kind != "bare":
            model, optimizer = accelerator.prepare(model, optimizer)
        if kind == "mmsoftmoe_compiled":
            model = torch.compile(model)
        loss_fn = open_clip.ClipLoss() if kind == "bare" else build_loss(
            "clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
        runs[kind] = (model, optimizer, loss_fn, make_batch(model, tokenizer, batch_size))
    times = {kind: [] for kind in kinds}
    for step in range(warmup + steps):  # interleaved: noise hits both alike
        for kind, (model, optimizer, loss_fn, batch) in runs.items():
            start = time.perf_counter()
            if kind == "bare":
                bare_step(model, optimizer, loss_fn, batch)
            else:
                ours_step(accelerator, model, optimizer, loss_fn, batch, step, kinds[kind])
            if step >= warmup:
                times[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    model, optimizer, loss_fn, batch = runs["bare"]
    step_flops = count_flops(lambda: bare_step(model, optimizer, loss_fn, batch))
    row = {"model": name, "batch": batch_size, "steps": steps,
           "bare_step_s": med["bare"], "mmsoftmoe_step_s": med["mmsoftmoe"],
           "noclip_step_s": med["mmsoftmoe_noclip"], "ratio": med["mmsoftmoe"] / med["bare"],
           "ratio_without_clipping": med["mmsoftmoe_noclip"] / med["bare"],
           "samples_per_s_mmsoftmoe": batch_size / med["mmsoftmoe"], "step_flops": step_flops,
           "mmsoftmoe_gflops_per_s": step_flops / med["mmsoftmoe"] / 1e9}
    if compile_:
        row |= {"compiled_step_s": med["mmsoftmoe_compiled"],
                "compile_ratio": med["mmsoftmoe_compiled"] / med["mmsoftmoe"]}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="Dense-Micro-4-32,SoftMoE-Micro-4-32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true",
                        help="also time the step with the model under torch.compile (inductor); adds minutes of "
                             "compilation to the warm-up")
    parser.add_argument("--out", default="benchmarks/results/train_bench.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load, warning = check_machine()
    rows = [bench_model(m, args.batch, args.steps, args.warmup, args.compile) for m in args.models.split(",")]
    peak = gemm_peak_gflops(2048, torch.float32, "cpu")
    for r in rows:
        r["pct_of_peak_gemm"] = 100 * r["mmsoftmoe_gflops_per_s"] / peak
    result = {"peak_gemm_gflops": peak, "load_before": load, "load_warning": warning, "threads": args.threads,
              "torch": torch.__version__, "target_ratio": TARGET_RATIO, "rows": rows}
    return write_results(result, format_table(rows, peak), args.out)


def format_table(rows: list[dict], peak: float) -> str:
    lines = [f"{'model':<22}{'bare ms':>10}{'ours ms':>10}{'ratio':>8}{'no-clip ratio':>15}{'ours samples/s':>16}"
             f"{'GFLOP/s':>9}{'%peak':>7}"]
    for r in rows:
        lines.append(f"{r['model']:<22}{1e3 * r['bare_step_s']:>10.1f}{1e3 * r['mmsoftmoe_step_s']:>10.1f}"
                     f"{r['ratio']:>8.3f}{r['ratio_without_clipping']:>15.3f}{r['samples_per_s_mmsoftmoe']:>16.1f}"
                     f"{r['mmsoftmoe_gflops_per_s']:>9.1f}{r['pct_of_peak_gemm']:>7.1f}")
    for r in rows:
        if "compile_ratio" in r:
            lines.append(f"{r['model']}: compiled {1e3 * r['compiled_step_s']:.1f} ms vs eager "
                         f"{1e3 * r['mmsoftmoe_step_s']:.1f} ms per step, compiled/eager {r['compile_ratio']:.3f}")
    lines.append(f"peak GEMM (fp32 mm 2048): {peak:.1f} GFLOP/s")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
