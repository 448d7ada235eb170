"""The GPU variant of the tower benchmark: bf16, S/16 and B/16 towers at batches that fill a GPU, MFU, memory.

Run as `python -m benchmarks.gpu_bench [--out F]`. Designed to finish in under 8 minutes on one GPU: it runs
`benchmarks.model_bench` with bf16 autocast, `small_patch16_224` at batch 256 and `base_patch16_224` at batch 128,
and reports images/s, MFU (achieved training FLOP/s over the measured bf16 GEMM peak of the same GPU in the same
run), and peak memory, for Soft MoE, its dense twin, Tokens Choice and Experts Choice. Without a GPU it prints why
and exits 0 without measuring anything.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks import model_bench

GPU_ARGS = ["--sizes", "small_patch16_224,base_patch16_224", "--batch", "256,128", "--steps", "10", "--warmup", "3",
            "--precision", "bf16", "--peak-size", "8192"]


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/gpu_bench.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU visible to torch; skipping (run benchmarks.model_bench for the CPU figures)",
              file=sys.stderr)
        return None
    print(f"gpu_bench on {torch.cuda.get_device_name()}")
    return model_bench.main([*GPU_ARGS, "--out", args.out])


if __name__ == "__main__":
    main()
