"""The device suite's parts: what one run measures (`Sizes`), the per-part recorder and the five measurements
(peak, towers, clip, sweep, layer), each run in its own process by `benchmarks.gpu_suite.runner`."""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
from accelerate import Accelerator
from torch import nn

import mmsoftmoe  # noqa: F401  (registers the towers and CLIP configs)
from benchmarks.common import synchronize, time_median
from benchmarks.layer_bench import (
    FWD_BWD_FLOP_FACTOR,
    LUCIDRAINS,
    SETTINGS,
    Setting,
    forward_backward,
    layer_specs,
    lucidrains_available,
)
from benchmarks.model_bench import family_names
from mmsoftmoe.layers import set_record_stats
from mmsoftmoe.machine import cpu_name, gemm_peak_gflops
from mmsoftmoe.models.accounting import count_flops, count_parameters, image_flops
from mmsoftmoe.models.clip import build_clip, preprocess_config
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.loop import build_loss, loss_terms, optimizer_step
from mmsoftmoe_training.optim import build_optimizer

PARTS_ORDER = ("peak", "towers", "clip", "sweep", "layer")
MODES = ("eager", "compiled")
CAPTION = "a photo of a small red square above a blue circle"


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
        seconds = time_median(fn, self.sizes.steps, max(0, self.sizes.warmup - 1), self.device)["median_s"]
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


