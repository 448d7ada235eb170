"""The device suite: everything issue 15 measures on one GPU, in one command, under 8 minutes, JSON + markdown.

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

from __future__ import annotations

import os

# The parent never initialises CUDA (its children need a fork-clean process); this makes `is_available` use NVML.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import timm  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from torch import nn  # noqa: E402

import mmsoftmoe  # noqa: E402, F401  (registers the towers and CLIP configs)
from benchmarks.layer_bench import (  # noqa: E402
    FWD_BWD_FLOP_FACTOR,
    LUCIDRAINS,
    SETTINGS,
    Setting,
    check_machine,
    forward_backward,
    layer_specs,
    lucidrains_available,
    machine_load,
)
from benchmarks.model_bench import family_names, median_seconds, synchronize  # noqa: E402
from mmsoftmoe.layers import set_record_stats  # noqa: E402
from mmsoftmoe.machine import cpu_name, gemm_peak_gflops  # noqa: E402
from mmsoftmoe.models.accounting import count_flops, count_parameters, image_flops  # noqa: E402
from mmsoftmoe.models.clip import build_clip, preprocess_config  # noqa: E402
from mmsoftmoe_training.config import load_config  # noqa: E402
from mmsoftmoe_training.loop import build_loss, loss_terms, optimizer_step  # noqa: E402
from mmsoftmoe_training.optim import build_optimizer  # noqa: E402

PARTS_ORDER = ("peak", "towers", "clip", "sweep", "layer")
MODES = ("eager", "compiled")
MIN_PART_S = 5.0  # a part is not started with less time than this left
KILL_MARGIN_S = 2.0  # a part stops starting rows this long before it would be killed
CAPTION = "a photo of a small red square above a blue circle"
TOWER_TARGET, MFU_DENSE_TARGET, MFU_SOFT_TARGET, SWEEP_TARGET = 1.15, 0.40, 0.35, 0.10


@dataclass(frozen=True)
class Sizes:
    """What one run of the suite measures, and the time it allows (GPU and CPU-smoke instances below)."""

    name: str
    peak_size: int
    peak_tries: int
    towers: tuple[tuple[str, int], ...]  # (tower size, batch); the last one is the target's
    clip_configs: dict[str, str]  # role ("dense", "soft_moe") -> shipped run config
    clip_overrides: tuple[str, ...]
    clip_batch: int
    open_clip_roles: tuple[str, ...]  # roles also timed with open_clip's own training step
    sweep_tower: str
    sweep_batch: int
    sweep_experts: tuple[int, ...]
    layer_settings: tuple[Setting, ...]
    steps: int
    warmup: int
    compile_backend: str
    compile_only: tuple[str, ...] | None  # "part/key/..." rows that compile; None: every row
    estimates: dict[str, tuple[float, float]]  # part -> seconds an (eager, compiled) row needs, to decide skips
    budgets: dict[str, float]  # part -> seconds
    total_budget_s: float
    cpu: bool


GPU = Sizes(
    name="gpu", peak_size=8192, peak_tries=10,
    towers=(("small_patch16_224", 256), ("base_patch16_224", 128)),
    clip_configs={"dense": "dense_b16_sigmoid_256", "soft_moe": "softmoe_b16_sigmoid_256"},
    clip_overrides=("data.source=shapes",), clip_batch=256, open_clip_roles=("dense", "soft_moe"),
    sweep_tower="small_patch16_224", sweep_batch=256, sweep_experts=(8, 16, 32, 64, 128, 256),
    layer_settings=(replace(SETTINGS["s16"], batch=256), Setting("b16", d=768, m=196, n=128, p=1, h=3072, batch=128)),
    steps=10, warmup=3, compile_backend="inductor", compile_only=None,
    estimates={"peak": (5, 5), "towers": (12, 75), "clip": (25, 120), "sweep": (12, 75), "layer": (5, 40)},
    budgets={"peak": 20, "towers": 140, "clip": 170, "sweep": 60, "layer": 60}, total_budget_s=450, cpu=False,
)
SMOKE = Sizes(
    name="cpu-smoke", peak_size=256, peak_tries=2,
    towers=(("micro_patch4_32", 4),),
    clip_configs=GPU.clip_configs, clip_overrides=(*GPU.clip_overrides, "smoke=true"), clip_batch=4,
    open_clip_roles=("dense",),
    sweep_tower="micro_patch4_32", sweep_batch=4, sweep_experts=(4, 8, 16),
    layer_settings=(SETTINGS["tiny"],),
    steps=2, warmup=1, compile_backend="eager", compile_only=("layer/tiny/soft_moe",),
    estimates={part: (0.0, 0.0) for part in PARTS_ORDER},
    budgets={part: 120.0 for part in PARTS_ORDER}, total_budget_s=600, cpu=True,
)


# One part's process: rows recorded as they finish.
@dataclass
class Recorder:
    """A part's rows, written to its JSON after every row, so a killed part loses only the row it was in."""

    part: str
    path: Path
    deadline: float  # time.time() after which no row starts
    data: dict = field(default_factory=lambda: {"rows": {}, "skipped": {}, "errors": {}, "current": None})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)

    def skip(self, key: tuple[str, ...], reason: str) -> None:
        self.data["skipped"]["/".join(key)] = reason
        self.save()

    def estimate(self, mode: str, default_s: float) -> float:
        """Seconds the next row of `mode` needs: the last such row's, or the default before the first."""
        return self.data.get("last_wall_s", {}).get(mode, default_s)

    def run(self, key: tuple[str, ...], estimate_s: float, fn: Callable[[], dict]) -> None:
        """Measure one row (key ends with the mode) unless its estimated cost overruns the part's deadline."""
        left = self.deadline - time.time()
        if left < estimate_s:
            self.skip(key, f"budget: {max(left, 0):.0f} s left, row needs about {estimate_s:.0f} s")
            return
        name = "/".join(key)
        self.data["current"] = name
        self.save()
        print(f"[gpu_suite] {self.part}/{name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            row = fn() | {"wall_s": time.perf_counter() - start}
            self.data.setdefault("last_wall_s", {})[key[-1]] = row["wall_s"]
            node = self.data["rows"]
            for k in key[:-1]:
                node = node.setdefault(k, {})
            node[key[-1]] = row
        except Exception as err:  # one failing row (OOM, a compile error) must not end the suite
            self.data["errors"][name] = f"{type(err).__name__}: {str(err)[:500]}"
        finally:
            cleanup(key[-1] == "compiled")
        self.data["current"] = None
        self.save()


def cleanup(compiled: bool) -> None:
    """Drop a row's models, graphs and cached GPU memory before the next row."""
    if compiled:
        torch._dynamo.reset()  # also keeps recompiles of one forward under dynamo's cache-size limit
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class Part:
    """What a part's measurements share: sizes, accelerator (device, bf16 autocast) and the recorder."""

    sizes: Sizes
    accelerator: Accelerator
    recorder: Recorder

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def measure(self, rows: dict[tuple[str, ...], Callable[[str], dict]],
                order: list[tuple[tuple[str, ...], str]] | None = None) -> None:
        """Measure rows in `order`, (key, mode) pairs, the most important first (default: every row eager, then
        every row compiled). A row starts only if the time it needs (the last row of its mode's wall time, an
        estimate before the first) is left; compiled rows this run leaves out are listed as skipped."""
        only, defaults = self.sizes.compile_only, dict(zip(MODES, self.sizes.estimates[self.recorder.part],
                                                           strict=True))
        for key, mode in order or [(key, mode) for mode in MODES for key in rows]:
            if mode == "compiled" and only is not None and "/".join((self.recorder.part, *key)) not in only:
                self.recorder.skip((*key, mode), f"{self.sizes.name}: compiled only {', '.join(only)}")
                continue
            self.recorder.run((*key, mode), self.recorder.estimate(mode, defaults[mode]),
                              lambda key=key, mode=mode: rows[key](mode))

    def compile(self, module: nn.Module, mode: str) -> nn.Module:
        return torch.compile(module, backend=self.sizes.compile_backend) if mode == "compiled" else module

    def timed(self, fn: Callable[[], object], flops: int, batch: int) -> dict:
        """First call on its own (compilation), then the median of `steps` after `warmup` more."""
        start = time.perf_counter()
        fn()
        synchronize(self.device)
        first = time.perf_counter() - start
        seconds = median_seconds(fn, self.sizes.steps, max(0, self.sizes.warmup - 1), self.device)
        return {"seconds": seconds, "flops": flops, "batch": batch, "first_call_s": first}

    def peak_bytes(self, fn: Callable[[], object]) -> int | None:
        """Peak GPU memory allocated during `fn()` (None on CPU: the suite measures GPU memory only)."""
        if self.device.type != "cuda":
            return None
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


# Part: peak.
def device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device_name": props.name, "device_memory_bytes": props.total_memory,
                 "capability": f"{props.major}.{props.minor}", "driver_visible_devices": torch.cuda.device_count()}
    else:
        info |= {"device_name": cpu_name(), "threads": torch.get_num_threads()}
    return info


def run_peak(part: Part) -> None:
    part.recorder.data["device"] = device_info(part.device)
    s = part.sizes
    part.recorder.run(("gemm", "bf16"), 0, lambda: {
        "size": s.peak_size, "tries": s.peak_tries,
        "tflops": gemm_peak_gflops(s.peak_size, torch.bfloat16, part.device, tries=s.peak_tries) / 1e3})


# Parts: towers and sweep.
def tower_row(part: Part, name: str, batch: int, mode: str, measures: tuple[str, ...], **kwargs) -> dict:
    """Training step (and, as asked, inference or forward+backward without the update) of one timm tower."""
    acc = part.accelerator
    torch.manual_seed(0)
    with part.device:
        model = timm.create_model(name, num_classes=0, **kwargs)
    set_record_stats(model, False)  # as a non-logging training step
    size = model.patch_embed.img_size
    flops, params = image_flops(model, size), count_parameters(model)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8)
    model, optimizer = acc.prepare(model, optimizer)
    model = part.compile(model, mode)
    x = torch.randn(batch, 3, *size, device=part.device)

    def forward_backward_step(update: bool) -> None:
        model.train()
        with acc.autocast():
            loss = model(x).float().pow(2).mean()
        acc.backward(loss)
        if update:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.no_grad(), acc.autocast():
            model(x)

    row = {"name": name, "params": params, "flops_per_image": flops,
           "train": part.timed(lambda: forward_backward_step(True), FWD_BWD_FLOP_FACTOR * flops * batch, batch),
           "peak_bytes": part.peak_bytes(lambda: forward_backward_step(True))}
    if "fwd_bwd" in measures:
        row["fwd_bwd"] = part.timed(lambda: forward_backward_step(False), FWD_BWD_FLOP_FACTOR * flops * batch, batch)
    if "infer" in measures and mode == "eager":  # compiling the eval graph too would double the compile time
        row["infer"] = part.timed(infer, flops * batch, batch)
    acc.free_memory()
    return row


def run_towers(part: Part) -> None:
    """Order: the twins eager, the target size's twins compiled, the sparse families eager, the rest compiled."""
    rows = {(size, family): lambda mode, name=name, batch=batch: tower_row(part, name, batch, mode, ("infer",))
            for size, batch in reversed(part.sizes.towers) for family, name in family_names(size).items()}
    target = part.sizes.towers[-1][0]
    twins = [key for key in rows if key[1] in ("dense", "soft_moe")]
    sparse = [key for key in rows if key not in twins]
    order = ([(key, "eager") for key in twins] + [(key, "compiled") for key in twins if key[0] == target]
             + [(key, "eager") for key in sparse] + [(key, "compiled") for key in twins if key[0] != target]
             + [(key, "compiled") for key in sparse])
    part.measure(rows, order)


def run_sweep(part: Part) -> None:
    s = part.sizes
    name = family_names(s.sweep_tower)["soft_moe"]
    experts = list(s.sweep_experts)
    order = [experts[0], experts[-1], *experts[1:-1]]  # the two ends first: they make the sweep's figure
    part.recorder.data["tower"] = name
    part.measure({(f"e{n}",): lambda mode, n=n: tower_row(
        part, name, s.sweep_batch, mode, ("fwd_bwd",), moe_kwargs=dict(num_experts=n, slots_per_expert=1))
        for n in order})


# Part: clip.
def clip_batch(model: nn.Module, tokenizer, batch: int, device: torch.device) -> dict:
    side = preprocess_config(model)["size"][0]
    return {"image": torch.randn(batch, 3, side, side, device=device), "text": tokenizer([CAPTION] * batch).to(device)}


def count_step_flops(model: nn.Module, loss_fn: nn.Module, batch: dict, part: Part) -> int:
    """FLOPs of one forward and backward of the whole CLIP model and its loss (math attention: counted)."""
    def step() -> None:
        with part.accelerator.autocast():
            losses = loss_terms(loss_fn, model(batch["image"], batch["text"]), None)
        sum(losses.values()).backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops


class OneBatchLoader:
    """open_clip's `data["train"].dataloader`: the same batch `n` times, stamping the (synchronised) time at
    which each step asks for its batch, so step i took stamps[i + 1] - stamps[i]."""

    def __init__(self, batch: dict, n: int, device: torch.device):
        self.batch, self.num_batches, self.device = batch, n, device
        self.num_samples = n * len(batch["image"])
        self.stamps: list[float] = []

    def __iter__(self):
        for _ in range(self.num_batches):
            synchronize(self.device)
            self.stamps.append(time.perf_counter())
            yield self.batch["image"], self.batch["text"]


def open_clip_step(part: Part, model: nn.Module, optimizer, loss_fn: nn.Module, batch: dict, grad_clip: float | None,
                   flops: int) -> dict:
    """open_clip's own training loop (`train_one_epoch`, amp_bf16, no scheduler) over one repeated batch: its
    steps are timed between batches; the first and last steps (those that log) are left out."""
    from open_clip_train.train import train_one_epoch

    s = part.sizes
    loader = OneBatchLoader(batch, s.warmup + s.steps + 1, part.device)
    args = SimpleNamespace(device=str(part.device), precision="amp_bf16", distill=False, accum_freq=1,
                           skip_scheduler=True, grad_clip_norm=grad_clip, horovod=False, wandb=False, rank=0,
                           local_rank=0, world_size=1, batch_size=len(batch["image"]), log_every_n_steps=10**9)
    data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda epoch: None)}
    if part.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(part.device)
    train_one_epoch(model, data, loss_fn, 0, optimizer, None, None, None, args)
    steps = [b - a for a, b in zip(loader.stamps, loader.stamps[1:], strict=False)]
    timing = {"seconds": float(torch.tensor(steps[s.warmup:]).median()), "flops": flops, "batch": args.batch_size,
              "first_call_s": steps[0]}
    peak = torch.cuda.max_memory_allocated(part.device) if part.device.type == "cuda" else None
    return {"step": timing, "peak_bytes": peak}


def clip_row(part: Part, role: str, kind: str, mode: str, flops_cache: dict) -> dict:
    """One CLIP training step, mmsoftmoe's or open_clip's, on the run config of `role`."""
    cfg = load_config(part.sizes.clip_configs[role], list(part.sizes.clip_overrides))
    acc = part.accelerator
    torch.manual_seed(0)
    model, tokenizer = build_clip(cfg.model.name, device=part.device)
    set_record_stats(model, False)  # as a non-logging step of `fit`
    unwrapped = model
    optimizer = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    loss_fn = build_loss(cfg.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=0,
                         world_size=1)
    batch = clip_batch(model, tokenizer, part.sizes.clip_batch, part.device)
    if role not in flops_cache:
        flops_cache[role] = count_step_flops(model, loss_fn, batch, part)
    row = {"model": cfg.model.name, "config": part.sizes.clip_configs[role], "params": count_parameters(model),
           "loss": cfg.loss, "grad_clip": cfg.optim.grad_clip}
    if kind == "open_clip":
        return row | open_clip_step(part, part.compile(model, mode), optimizer, loss_fn, batch, cfg.optim.grad_clip,
                                    flops_cache[role])
    model, optimizer = acc.prepare(model, optimizer)
    model = part.compile(model, mode)  # as `fit` does with model.compile=true

    def step() -> None:
        optimizer_step(model, optimizer, [batch], loss_fn=loss_fn, accelerator=acc, routed_model=unwrapped.visual,
                       aux_weight=cfg.aux_loss_weight, lr=cfg.optim.lr, grad_clip=cfg.optim.grad_clip)

    row |= {"step": part.timed(step, flops_cache[role], part.sizes.clip_batch), "peak_bytes": part.peak_bytes(step)}
    acc.free_memory()
    return row


def run_clip(part: Part) -> None:
    """Order: dense eager (ours, open_clip's), Soft MoE eager, ours compiled, then the rest."""
    flops_cache = part.recorder.data.setdefault("step_flops", {})
    kinds = [(role, "mmsoftmoe") for role in part.sizes.clip_configs]
    kinds += [(role, "open_clip") for role in part.sizes.open_clip_roles]
    rows = {key: lambda mode, key=key: clip_row(part, *key, mode, flops_cache) for key in kinds}
    first = [(("dense", "mmsoftmoe"), "eager"), (("dense", "open_clip"), "eager"), (("soft_moe", "mmsoftmoe"), "eager"),
             (("dense", "mmsoftmoe"), "compiled"), (("soft_moe", "mmsoftmoe"), "compiled"),
             (("dense", "open_clip"), "compiled")]
    order = [(key, mode) for key, mode in first if key in rows]
    part.measure(rows, order + [(key, mode) for mode in MODES for key in rows if (key, mode) not in order])


# Part: layer.
class Autocast(nn.Module):
    """A layer under bf16 autocast, returning its input's dtype (as inside a bf16-autocast network)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return self.inner(x).to(x.dtype)


def layer_row(part: Part, spec, s: Setting, mode: str) -> dict:
    torch.manual_seed(0)
    with part.device:
        layer = part.compile(Autocast(spec.build(s)), mode)
        x = torch.randn(s.batch, s.m, s.d, requires_grad=True)
        grad_out = torch.randn(s.batch, s.m, s.d)
    layer.train()
    return {"fwd_bwd": part.timed(forward_backward(layer, x, grad_out), FWD_BWD_FLOP_FACTOR * spec.flops(s), s.batch),
            "forward_flops": spec.flops(s), "setting": vars(s) | {"slots": s.slots}}


def run_layer(part: Part) -> None:
    wanted = ("soft_moe", "dense", LUCIDRAINS)
    specs = [spec for spec in layer_specs(lucidrains_available()) if spec.name in wanted]
    if LUCIDRAINS not in {spec.name for spec in specs}:
        part.recorder.data["notes"] = ["soft-moe-pytorch not installed (pip install -e '.[bench]'): not measured"]
    part.measure({(s.name, spec.name): lambda mode, spec=spec, s=s: layer_row(part, spec, s, mode)
                  for spec in specs for s in reversed(part.sizes.layer_settings)})


PARTS: dict[str, Callable[[Part], None]] = {
    "peak": run_peak, "towers": run_towers, "clip": run_clip, "sweep": run_sweep, "layer": run_layer}


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


# Derived figures.
def derive_timing(t: dict, peak_tflops: float | None) -> None:
    """samples/s, TFLOP/s and MFU of one timing ({"seconds", "flops", "batch"}), in place."""
    t["samples_per_s"] = t["batch"] / t["seconds"]
    t["tflops_per_s"] = t["flops"] / t["seconds"] / 1e12
    t["mfu"] = None if peak_tflops is None else t["tflops_per_s"] / peak_tflops


def timings(node) -> list[dict]:
    """Every timing dict anywhere under `node`."""
    if not isinstance(node, dict):
        return []
    if {"seconds", "flops", "batch"} <= node.keys():
        return [node]
    return [t for v in node.values() for t in timings(v)]


def mode_rows(node: dict, key: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """(key, {mode: row}) of every measured row group (the dicts whose keys are modes)."""
    if node and set(node) <= set(MODES):
        return [(key, node)]
    return [r for k, v in node.items() if isinstance(v, dict) for r in mode_rows(v, (*key, k))]


def time_ratio(a: dict | None, b: dict | None, what: str) -> float | None:
    """Time per sample of row a's `what` over row b's (None if either is missing)."""
    if a is None or b is None or what not in a or what not in b:
        return None
    return (a[what]["seconds"] / a[what]["batch"]) / (b[what]["seconds"] / b[what]["batch"])


def compile_speedups(rows: dict) -> dict:
    """Eager time over compiled time, per row and timing."""
    out = {}
    for key, modes in mode_rows(rows):
        if set(MODES) <= modes.keys():
            eager, compiled = modes["eager"], modes["compiled"]
            out["/".join(key)] = {w: time_ratio(eager, compiled, w) for w in compiled if w in eager
                                  and isinstance(compiled[w], dict) and "seconds" in compiled[w]}
    return out


def tower_ratios(rows: dict) -> dict:
    """Each family's training and inference time per image over its dense twin's, per size and mode."""
    return {size: {family: {mode: {w: time_ratio(row, families.get("dense", {}).get(mode), w)
                                   for w in ("train", "infer") if w in row}
                            for mode, row in modes.items()}
                   for family, modes in families.items()}
            for size, families in rows.items()}


def layer_ratios(rows: dict) -> dict:
    """Soft MoE's forward+backward time over the dense MLP's and soft-moe-pytorch's, per setting and mode."""
    out = {}
    for setting, layers in rows.items():
        ours = layers.get("soft_moe", {})
        out[setting] = {f"soft_moe/{other}": {mode: time_ratio(row, layers[other].get(mode), "fwd_bwd")
                                              for mode, row in ours.items()}
                        for other in layers if other != "soft_moe"}
    return out


def clip_ratios(rows: dict) -> dict:
    """mmsoftmoe's step time over open_clip's, per role and mode."""
    return {role: {mode: time_ratio(row, kinds.get("open_clip", {}).get(mode), "step")
                   for mode, row in kinds.get("mmsoftmoe", {}).items()}
            for role, kinds in rows.items() if "open_clip" in kinds}


def sweep_figures(rows: dict, experts: tuple[int, ...]) -> dict:
    """Images/s per expert count, and the loss 1 - last/first from the fewest to the most experts, per mode."""
    out = {}
    first, last = f"e{experts[0]}", f"e{experts[-1]}"
    for mode in MODES:
        for what in ("train", "fwd_bwd"):
            ips = {k: row[mode][what]["samples_per_s"] for k, row in sorted(rows.items(), key=lambda kv: int(kv[0][1:]))
                   if what in row.get(mode, {})}
            if first in ips and last in ips:
                out.setdefault(mode, {})[what] = {"images_per_s": ips, "loss": 1 - ips[last] / ips[first]}
    return out


def target(description: str, per_mode: dict[str, float | None], threshold: float, at_most: bool) -> dict:
    """A target: the best value over modes (lowest for an upper bound), and whether it meets the threshold."""
    values = {m: v for m, v in per_mode.items() if v is not None}
    if not values:
        return {"description": description, "threshold": threshold, "at_most": at_most, "per_mode": per_mode,
                "value": None, "mode": None, "met": None}
    mode = (min if at_most else max)(values, key=values.get)
    value = values[mode]
    return {"description": description, "threshold": threshold, "at_most": at_most, "per_mode": per_mode,
            "value": value, "mode": mode, "met": value <= threshold if at_most else value >= threshold}


def targets(sizes: Sizes, derived: dict, rows: dict) -> dict:
    size = sizes.towers[-1][0]
    tower = derived.get("towers", {}).get(size, {}).get("soft_moe", {})
    clip = rows.get("clip", {})

    def mfu(role: str) -> dict:
        return {m: r["step"].get("mfu") for m, r in clip.get(role, {}).get("mmsoftmoe", {}).items()}

    sweep = derived.get("sweep", {})
    return {
        "soft_moe_train_time_per_image_vs_dense": target(
            f"Soft MoE {size} training time per image / its dense twin's <= {TOWER_TARGET}",
            {m: r.get("train") for m, r in tower.items()}, TOWER_TARGET, at_most=True),
        "clip_step_mfu_dense": target(f"CLIP training step MFU, dense ({sizes.clip_configs['dense']}) >= "
                                      f"{MFU_DENSE_TARGET:.0%}", mfu("dense"), MFU_DENSE_TARGET, at_most=False),
        "clip_step_mfu_soft_moe": target(f"CLIP training step MFU, Soft MoE ({sizes.clip_configs['soft_moe']}) >= "
                                         f"{MFU_SOFT_TARGET:.0%}", mfu("soft_moe"), MFU_SOFT_TARGET, at_most=False),
        "expert_sweep_loss": target(
            f"training throughput lost from {sizes.sweep_experts[0]} to {sizes.sweep_experts[-1]} experts "
            f"<= {SWEEP_TARGET:.0%}", {m: f.get("train", {}).get("loss") for m, f in sweep.items()},
            SWEEP_TARGET, at_most=True),
    }


def derive(report: dict, sizes: Sizes) -> None:
    """Every derived figure of the report, in place, from the parts' raw measurements."""
    parts = report["parts"]
    gemm = parts.get("peak", {}).get("rows", {}).get("gemm", {}).get("bf16")
    peak = gemm["tflops"] if gemm else None
    report["peak_tflops"] = peak
    for data in parts.values():
        for t in timings(data["rows"]):
            derive_timing(t, peak)
    rows = {name: data["rows"] for name, data in parts.items()}
    derived = {
        "towers": tower_ratios(rows.get("towers", {})),
        "clip_vs_open_clip": clip_ratios(rows.get("clip", {})),
        "layer": layer_ratios(rows.get("layer", {})),
        "sweep": sweep_figures(rows.get("sweep", {}), sizes.sweep_experts),
        "compile_speedup": {name: compile_speedups(r) for name, r in rows.items() if name != "peak"},
    }
    report["derived"] = derived
    report["targets"] = targets(sizes, derived, rows)


# Report.
def fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(x) + " |"
                                                                              for x in lines]


def compiled_speedup(report: dict, part: str, key: str, mode: str, what: str) -> float | None:
    """A compiled row's speed-up over its eager twin (None on eager rows)."""
    return report["derived"]["compile_speedup"][part].get(key, {}).get(what) if mode == "compiled" else None


def targets_section(report: dict) -> list[str]:
    meta = report["meta"]
    out = [f"# gpu_suite ({meta['sizes']}): {meta['device_name'] or '?'}, {meta['date']}", "",
           f"torch {meta['torch']}, CUDA {meta.get('cuda')}, commit {meta['commit']}; bf16 GEMM peak "
           f"{fmt(report['peak_tflops'], '.1f')} TFLOP/s (measured in this run); {meta['elapsed_s']:.0f} s of the "
           f"{meta['budget_s']:.0f} s budget. MFU: achieved (counted) FLOP/s over that peak.", "", "## Targets", ""]
    return out + table(["target", "value", "mode", "met"], [
        [t["description"], fmt(t["value"], ".3f"), t["mode"] or "-",
         {True: "yes", False: "NO", None: "unmeasured"}[t["met"]]] for t in report["targets"].values()])


def towers_section(report: dict) -> list[str]:
    ratios, lines = report["derived"]["towers"], []
    for size, families in report["parts"].get("towers", {}).get("rows", {}).items():
        for family, modes in families.items():
            for mode, r in modes.items():
                ratio = ratios[size][family][mode]
                lines.append([size, family, mode, fmt(r["train"]["samples_per_s"], ".0f"),
                              fmt(r["train"]["mfu"], ".1f", 100), fmt(ratio.get("train"), ".3f"),
                              fmt(r.get("infer", {}).get("samples_per_s"), ".0f"), fmt(ratio.get("infer"), ".3f"),
                              fmt(r["peak_bytes"], ".2f", 2**-30), fmt(r["params"], ".1f", 1e-6),
                              fmt(compiled_speedup(report, "towers", f"{size}/{family}", mode, "train")),
                              fmt(r["train"]["first_call_s"], ".1f")])
    return ["", "## Towers: training step (forward, backward, AdamW), bf16 autocast", ""] + table(
        ["tower", "family", "mode", "train img/s", "MFU %", "time/img vs dense", "infer img/s", "infer vs dense",
         "peak GiB", "params M", "compile speed-up", "first call s"], lines)


def clip_section(report: dict) -> list[str]:
    vs_open_clip = report["derived"]["clip_vs_open_clip"]
    lines = [[r["model"], kind, mode, fmt(r["step"]["samples_per_s"], ".1f"), fmt(r["step"]["mfu"], ".1f", 100),
              fmt(vs_open_clip.get(role, {}).get(mode) if kind == "mmsoftmoe" else None, ".3f"),
              fmt(r["peak_bytes"], ".2f", 2**-30),
              fmt(compiled_speedup(report, "clip", f"{role}/{kind}", mode, "step")),
              fmt(r["step"]["first_call_s"], ".1f")]
             for role, kinds in report["parts"].get("clip", {}).get("rows", {}).items()
             for kind, modes in kinds.items() for mode, r in modes.items()]
    return ["", "## CLIP training step (image + text towers, loss, AdamW), samples/s per GPU", ""] + table(
        ["model", "step", "mode", "samples/s", "MFU %", "time vs open_clip", "peak GiB", "compile speed-up",
         "first call s"], lines)


def sweep_section(report: dict) -> list[str]:
    sweep = report["parts"].get("sweep", {})
    lines = [[k.removeprefix("e"), mode, fmt(r["train"]["samples_per_s"], ".0f"), fmt(r["train"]["mfu"], ".1f", 100),
              fmt(r["fwd_bwd"]["samples_per_s"], ".0f"), fmt(r["params"], ".1f", 1e-6),
              fmt(r["peak_bytes"], ".2f", 2**-30)]
             for k, modes in sorted(sweep.get("rows", {}).items(), key=lambda kv: int(kv[0][1:]))
             for mode, r in modes.items()]
    losses = [f"{mode}: " + ", ".join(f"{what} {f[what]['loss']:.1%}" for what in ("train", "fwd_bwd") if what in f)
              for mode, f in report["derived"]["sweep"].items()]
    return (["", f"## Expert sweep: {sweep.get('tower', '-')}, one slot per expert", ""]
            + table(["experts", "mode", "train img/s", "MFU %", "fwd+bwd img/s", "params M", "peak GiB"], lines)
            + ["", "Loss from the fewest to the most experts: " + ("; ".join(losses) or "-")])


def layer_section(report: dict) -> list[str]:
    lines = []
    for setting, layers in report["parts"].get("layer", {}).get("rows", {}).items():
        for layer, modes in layers.items():
            for mode, r in modes.items():
                ratio = {k.split("/")[1]: v.get(mode) for k, v in report["derived"]["layer"][setting].items()}
                ours = layer == "soft_moe"
                lines.append([f"{setting} (b={r['setting']['batch']})", layer, mode,
                              fmt(r["fwd_bwd"]["seconds"], ".2f", 1e3), fmt(r["fwd_bwd"]["mfu"], ".1f", 100),
                              fmt(ratio.get("dense") if ours else None, ".3f"),
                              fmt(ratio.get(LUCIDRAINS) if ours else None, ".3f"),
                              fmt(compiled_speedup(report, "layer", f"{setting}/{layer}", mode, "fwd_bwd")),
                              fmt(r["fwd_bwd"]["first_call_s"], ".1f")])
    return ["", "## Soft MoE layer: forward + backward, bf16 autocast", ""] + table(
        ["setting", "layer", "mode", "ms", "MFU %", "time vs dense", "time vs soft-moe-pytorch", "compile speed-up",
         "first call s"], lines)


def markdown(report: dict) -> str:
    sections = (targets_section, towers_section, clip_section, sweep_section, layer_section)
    out = [line for section in sections for line in section(report)]
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes(report["parts"])]
    return "\n".join(out) + "\n"


def notes(parts: dict) -> list[str]:
    """Everything not measured, and why: parts not run or killed, rows skipped or failed."""
    out = []
    for name, data in parts.items():
        for key in ("not_run", "killed", "failed"):
            if key in data:
                out.append(f"{name}: {data[key]}")
        out += [f"{name}: {n}" for n in data.get("notes", [])]
        out += [f"{name}/{row}: skipped ({why})" for row, why in data.get("skipped", {}).items()]
        out += [f"{name}/{row}: ERROR {err}" for row, err in data.get("errors", {}).items()]
    return out or ["every row measured"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
