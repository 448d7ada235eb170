"""The device suite: everything issue 15 measures on one GPU, in one command, under 8 minutes, JSON + markdown.

Modules: `runner` (parts in processes, budgets, `main`), `parts` (what a run measures and the five measurements),
`report` (derived figures, targets, markdown).

Run as `python -m benchmarks.gpu_suite [--parts peak,towers,clip,sweep,layer] [--budget-s 450] [--out DIR]`, or
`--cpu-smoke` for the same code paths at seconds-long sizes on CPU (what `tests/test_gpu_suite.py` runs). Without
a CUDA GPU and without `--cpu-smoke` it says so and measures nothing.

Parts, in the order they run (each in its own process, forked from this one, so accelerate's state, the GPU
memory and torch.compile's caches start clean, and a part that overruns its budget can be killed):
- `peak`: the bf16 GEMM peak of the device (`mmsoftmoe.machine.gemm_peak_gflops`, 8192^2, best of 10), and the
  device name, torch and CUDA versions. Every MFU below is achieved FLOP/s over this peak.
- `towers`: S/16 (batch 256) and B/16 (batch 128) towers, Soft MoE, its dense twin, Tokens Choice (k 1) and Experts
  Choice (`benchmarks.model_bench.family_names`): training images/s (forward, backward, AdamW), inference images/s
  (eager only), peak memory of a training step, time per image relative to the dense twin.
- `clip`: one full CLIP training step (image and text towers, SigLIP loss, AdamW, clipping) for the run configs
  `dense_b16_sigmoid_256` and `softmoe_b16_sigmoid_256` at batch 256: mmsoftmoe's step
  (`training.loop.optimizer_step` under `Accelerator(mixed_precision="bf16")`) and open_clip's own step
  (`open_clip_train.train.train_one_epoch`, amp_bf16, on an in-memory loader), same model, batch and optimizer.
- `sweep`: Soft MoE S/16 at one slot per expert with 8 -> 256 experts (`moe_kwargs=dict(num_experts=n)`): training
  images/s, and forward+backward images/s without the AdamW update (the optimizer's cost grows with the experts'
  parameters; the paper's Figure 6 is about the network).
- `layer`: the Soft MoE layer at the S/16 and B/16 settings (batch 256 / 128) against the dense MLP and
  soft-moe-pytorch (`benchmarks.layer_bench` specs), forward+backward under bf16 autocast.
Every part measures its rows eager and compiled (`torch.compile`, default mode, as `fit` with `model.compile=true`),
the rows the targets need first.

Timing: a row's first call is reported on its own (`first_call_s`: compilation for compiled rows), then the median
of `steps` calls after `warmup` more, each followed by a device synchronisation. FLOPs are counted by
`mmsoftmoe.models.accounting` (`FlopCounterMode`, math attention so attention is counted): towers 3x the forward
count of one image, the CLIP step its forward and backward at the batch, layers 3x the forward FLOPs the layer
declares (`benchmarks.layer_bench` specs). Peak memory: CUDA `max_memory_allocated` over a step (on CPU: not
measured).

Budget: the suite stops at `--budget-s` (450 s). Each part gets its share plus what earlier parts left unused;
inside a part a row starts only if its estimated cost still fits (else it is listed as skipped, with the reason),
and a part still running at its deadline is killed (its finished rows are kept: a part writes its JSON after every
row) and noted. Safe to re-run: every run rewrites `DIR/gpu_suite.json`, `DIR/gpu_suite.md` and `DIR/parts/`.

Derived figures (computed here from the parts' raw seconds, FLOPs and batches, nowhere else): samples/s, TFLOP/s,
MFU, time ratios, compile speed-ups, the sweep's loss and the targets of issue 15, each met if some mode meets it.
"""

import os

# The parent never initialises CUDA (its children need a fork-clean process); this makes `is_available` use NVML.
# Set here, before any of the package's modules imports torch.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

from benchmarks.gpu_suite.parts import CAPTION, PARTS, PARTS_ORDER  # noqa: E402
from benchmarks.gpu_suite.report import target  # noqa: E402
from benchmarks.gpu_suite.runner import main  # noqa: E402

__all__ = ["CAPTION", "PARTS", "PARTS_ORDER", "main", "target"]
