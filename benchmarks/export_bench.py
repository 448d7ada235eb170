"""Export benchmark: export time and size per format, onnxruntime CPU images/s vs eager PyTorch, parity figures.

Run as `python -m benchmarks.export_bench [--model SoftMoE-Micro-4-32] [--checkpoint DIR] [--formats all]
[--batch 32] [--threads 2] [--repeats 20] [--warmup 3] [--out benchmarks/results/export_bench.json]`.

- Export: `mmsoftmoe.export.export_checkpoint` of a checkpoint (`--checkpoint`, or a freshly built `--model` with
  seeded random weights) into a temporary folder; its reports give the export time (writing only), the size on
  disk (model files, without card and report) and the parity figures it measured right after writing.
- Throughput: the image encoder on one fixed float32 batch of `--batch` images, eager PyTorch (`model.visual`
  under `torch.no_grad`), the `torch.export` program and onnxruntime's CPU provider, each with `--threads`
  intra-op threads (onnxruntime: one inter-op thread); images/s from the median of `--repeats` timed calls.
  The max abs difference of each to eager on that batch is reported beside it.
- Machine state: load average and CPU busy fraction before, load after; a loud warning when the machine is busy.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import check_machine, time_median, write_results
from mmsoftmoe.export import export_checkpoint, parse_formats
from mmsoftmoe.export.core import max_abs_diff
from mmsoftmoe.export.onnx_format import OnnxEncoder
from mmsoftmoe.export.torch_export_format import load as load_program
from mmsoftmoe.models.clip import build_clip, load_clip, resolve_clip_config, save_clip


def make_checkpoint(model_name: str, folder: Path, seed: int = 0) -> Path:
    """A checkpoint folder of `model_name` with seeded random weights."""
    torch.manual_seed(seed)
    model, _ = build_clip(model_name)
    return save_clip(model, resolve_clip_config(model_name), folder)


def throughput(encoder: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, reference: torch.Tensor,
               repeats: int, warmup: int) -> dict:
    """Images/s of `encoder` on `pixels` (median call), and its max abs difference to `reference`."""
    with torch.no_grad():
        timing = time_median(lambda: encoder(pixels), repeats, warmup)
        diff = max_abs_diff(encoder(pixels), reference)
    return {"images_per_s": len(pixels) / timing["median_s"], "median_s": timing["median_s"], "max_abs_diff": diff}


def bench_runtimes(checkpoint: Path, exports: dict[str, dict], batch: int, threads: int, repeats: int,
                   warmup: int) -> dict[str, dict]:
    """Eager PyTorch vs the exported runtimes among `exports` (format -> report), on the same batch."""
    model, _, _ = load_clip(checkpoint)
    encoder = model.visual.eval()
    pixels = torch.randn(batch, 3, *encoder.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = encoder(pixels)
    runtimes = {"eager_pytorch": encoder}
    if "torch_export" in exports:
        runtimes["torch_export"] = load_program(Path(exports["torch_export"]["folder"]))
    if "onnx" in exports:
        runtimes["onnxruntime_cpu"] = OnnxEncoder(Path(exports["onnx"]["folder"]) / "model.onnx", threads=threads)
    return {name: throughput(run, pixels, reference, repeats, warmup) for name, run in runtimes.items()}


def format_table(exports: dict[str, dict], runtimes: dict[str, dict]) -> str:
    lines = [f"{'format':<13} {'export (s)':>10} {'size (MiB)':>10} {'parity max abs diff':>20} {'batch-1 diff':>12}"]
    for name, r in exports.items():
        lines.append(f"{name:<13} {r['export_seconds']:>10.2f} {r['size_bytes'] / 2**20:>10.2f} "
                     f"{r['parity']['max_abs_diff']:>20.3g} {r['parity']['batch1_vs_batch_max_abs_diff']:>12.3g}")
    eager = runtimes["eager_pytorch"]["images_per_s"]
    lines += ["", f"{'runtime':<16} {'images/s':>10} {'vs eager':>9} {'max abs diff':>13}"]
    for name, r in runtimes.items():
        lines.append(f"{name:<16} {r['images_per_s']:>10.1f} {r['images_per_s'] / eager:>8.2f}x "
                     f"{r['max_abs_diff']:>13.3g}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="SoftMoE-Micro-4-32", help="CLIP config to build when no --checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="benchmark this checkpoint folder instead")
    parser.add_argument("--formats", default="all", help="comma-separated export formats, or 'all'")
    parser.add_argument("--batch", type=int, default=32, help="images per call in the throughput runs")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads (torch and onnxruntime)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per runtime (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/export_bench.json"))
    args = parser.parse_args(argv)
    if args.batch < 2 or args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch must be >= 2, --threads and --repeats >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the JSON report and the table, write the report to --out and return it."""
    args = parse_args(argv)
    formats = parse_formats(args.formats)
    load, warning = check_machine()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = args.checkpoint or make_checkpoint(args.model, Path(tmp) / "checkpoint")
            exports = export_checkpoint(checkpoint, formats, Path(tmp) / "export")
            runtimes = bench_runtimes(checkpoint, exports, args.batch, args.threads, args.repeats, args.warmup)
    finally:
        torch.set_num_threads(previous_threads)
    meta = {"model": None if args.checkpoint else args.model, "checkpoint": str(args.checkpoint or ""),
            "batch": args.batch, "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
            "torch_version": torch.__version__, "load_before": load, "load_warning": warning}
    table = format_table(exports, runtimes) + f"\n\nthreads {args.threads}, batch {args.batch}"
    return write_results({"meta": meta, "exports": exports, "runtimes": runtimes}, table, args.out, meta=meta)

if __name__ == "__main__":
    main()
