"""Tower throughput: Soft MoE vs its dense twin vs Tokens Choice vs Experts Choice, per tower size.

Run as `python -m benchmarks.model_bench [--sizes micro_patch4_32,small_patch16_224] [--batch 32] [--steps 5]
[--precision no|bf16] [--out F]`. For each size it builds the registered towers of every family (pooled features,
no head), then measures in one run:
- parameters: total, and for Soft MoE the FLOP-equivalent active count (`mmsoftmoe.models.accounting`);
- FLOPs per image, counted with `FlopCounterMode` on one forward (math attention so attention is counted);
- inference images/s (eval, no grad) and training images/s (forward + backward + AdamW step), medians over
  `--steps` after warm-up, on accelerate's device with its autocast;
- peak memory of a training step (CUDA: `max_memory_allocated`; CPU: peak live bytes in torch's allocator);
- achieved GFLOP/s (training counts 3x the forward FLOPs) as a fraction of the measured peak GEMM throughput of
  the same machine in the same run (fp32 `torch.mm` on CPU; bf16 on GPU with `--precision bf16`);
- ratios to the dense twin: time per image and parameters. The paper's claim to check: Soft MoE costs about the
  dense twin's time per image while holding far more parameters.
The machine's load is recorded before and after (a warning when busy).
"""

from __future__ import annotations

import argparse
import gc

import timm
import torch
from accelerate import Accelerator

import mmsoftmoe  # noqa: F401  (registers the towers)
from benchmarks.common import check_machine, peak_alloc_bytes, time_median, write_results
from mmsoftmoe.machine import gemm_peak_gflops
from mmsoftmoe.models.accounting import image_flops, parameter_counts
from mmsoftmoe.models.mmsoftmoe_vit import SPARSE_TWINS, TOWERS


def family_names(size: str) -> dict[str, str]:
    experts = TOWERS[size][1]
    names = {"dense": f"dense_vit_{size}", "soft_moe": f"softmoe_vit_{size}_e{experts}"}
    if size in SPARSE_TWINS:
        names["tokens_choice_k1"] = f"tokenschoice_vit_{size}_e{experts}_k1"
        names["experts_choice"] = f"expertschoice_vit_{size}_e{experts}"
    return names


def bench_tower(name: str, accelerator: Accelerator, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=0)
    size = model.patch_embed.img_size
    counts = parameter_counts(model, model)
    flops = image_flops(model, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device
    x = torch.randn(batch, 3, *size, device=device)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), accelerator.autocast():
            model(x)

    def train() -> None:
        model.train()
        with accelerator.autocast():
            loss = model(x).float().pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    infer_s = time_median(infer, steps, warmup, device)["median_s"]
    train_s = time_median(train, steps, warmup, device)["median_s"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        train()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_alloc_bytes(train)
    result = {"name": name, "params_total": counts["total"], "params_flop_equivalent_active":
              counts["flop_equivalent_active"], "flops_per_image": flops, "batch": batch,
              "infer_images_per_s": batch / infer_s, "train_images_per_s": batch / train_s,
              "train_gflops_per_s": 3 * flops * batch / train_s / 1e9, "train_peak_bytes": peak}
    accelerator.free_memory()  # drops accelerate's references; the locals go with the frame
    gc.collect()
    return result


def add_ratios(rows: dict[str, dict], peak: float) -> None:
    dense = rows["dense"]
    for row in rows.values():
        row["pct_of_peak_gemm"] = 100 * row["train_gflops_per_s"] / peak
        row["train_time_per_image_vs_dense"] = dense["train_images_per_s"] / row["train_images_per_s"]
        row["infer_time_per_image_vs_dense"] = dense["infer_images_per_s"] / row["infer_images_per_s"]
        row["params_vs_dense"] = row["params_total"] / dense["params_total"]


def format_table(size: str, rows: dict[str, dict]) -> str:
    lines = [f"\n{size}", f"{'family':<18}{'params M':>10}{'GFLOP/img':>11}{'infer img/s':>13}{'train img/s':>13}"
          f"{'%peak':>7}{'time/img vs dense':>19}{'params vs dense':>17}{'peak MiB':>10}"]
    for family, r in rows.items():
        lines.append(f"{family:<18}{r['params_total'] / 1e6:>10.1f}{r['flops_per_image'] / 1e9:>11.3f}"
                     f"{r['infer_images_per_s']:>13.1f}{r['train_images_per_s']:>13.1f}{r['pct_of_peak_gemm']:>7.1f}"
                     f"{r['train_time_per_image_vs_dense']:>19.2f}{r['params_vs_dense']:>17.1f}"
                     f"{r['train_peak_bytes'] / 2**20:>10.0f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="micro_patch4_32,small_patch16_224")
    parser.add_argument("--batch", default="32,8", help="batch per size (one value for all, or one per size)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the GEMM that measures the peak")
    parser.add_argument("--out", default="benchmarks/results/model_bench.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(mixed_precision=args.precision)
    sizes = args.sizes.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    batches = batches * len(sizes) if len(batches) == 1 else batches
    load, warning = check_machine()
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    peak = gemm_peak_gflops(args.peak_size, dtype, accelerator.device)
    result = {"device": str(accelerator.device), "precision": args.precision, "peak_gemm_gflops": peak,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "load_before": load,
              "load_warning": warning, "sizes": {}}
    tables = []
    for size, batch in zip(sizes, batches, strict=True):
        rows = {family: bench_tower(name, accelerator, batch, args.steps, args.warmup)
                for family, name in family_names(size).items()}
        add_ratios(rows, peak)
        result["sizes"][size] = rows
        tables.append(format_table(size, rows))
    tables.append(f"\npeak GEMM ({dtype}): {peak:.1f} GFLOP/s on {accelerator.device}")
    return write_results(result, "\n".join(tables), args.out)


if __name__ == "__main__":
    main()
