"""The paper's comparison at small scale, on a task that rewards parameters: quality vs cost of Soft MoE, sparse
MoE and dense image towers at equal FLOPs per image (issue 13; docs/design.md, sections 1-3).

Run as `python -m benchmarks.study [--quick] [--steps N] [--seeds 0,1,2] [--variants a,b] [--router-lr-mult X]
[--init timm|vmoe] [--jobs 2] [--device cuda --jobs 8] [--out benchmarks/results/study]`.

Puigcerver et al. 2024 claim (Table 2, Figure 3) that at equal FLOPs Soft MoE beats dense and the sparse MoEs, and
(Table 3) that learned soft routing beats its uniform and identity ablations; the gain is parameters at equal cost,
and it needs data (JFT, 300k+ steps). This study tests those claims where they can show:

- Task: `mmsoftmoe.data.glyphs.GlyphTask`, an unbounded stream of images each holding 3 of 256 random 4x4 glyphs
  (random masks in random colours, on a random background, pixel noise), each glyph in one patch, the glyphs dealt at
  random into 16 classes; multi-hot labels over the classes, sigmoid cross-entropy (the paper's JFT objective,
  supervised on the tower: no text tower). Naming an image's classes needs a 256-entry lookup table from arbitrary
  patterns to classes: memory, which MLP and expert parameters hold, behind an output only 16 wide. Batch `step` of
  seed s is drawn from (s, step) alone, so every variant of a seed sees the same images: differences between
  variants are paired by seed. Quality is top-3 recall (the fraction of an image's 3 classes among its 3 highest
  logits; chance 3/16) on a fixed held-out set of 10k images (a stream seed no training run uses).
  The first design (64 glyphs of 6 px at any pixel offset, every glyph its own class; `--num-glyphs 64 --num-classes
  0 --glyph-size 6 --grid 1`) learned too slowly to reward anything at this budget (the 4x-wide MLP lost by 10 points).
- Calibration (part of the result): the dense tower against the same tower with a 4x wider MLP, its second matrix
  under muP (init / 2, lr / 4): without muP the wide MLP learns far slower at the same lr (6% vs 26% at 300 steps).
  Only if the wide model wins can the task be said to reward extra MLP parameters.
- Variants, all the micro tower (32 px, 4 px patches: m = 64 tokens, width 64, depth 4, MoE in the last 2 blocks),
  all at the dense tower's FLOPs per image except where named: `dense`; `softmoe_p1` (64 experts x 1 slot, the
  paper's choice); `softmoe_e16_s4` (16 experts x 4 slots); `experts_choice` (64 experts, capacity factor 1);
  `tokens_choice_k1` (64 experts, capacity factor 1, no rounding of the buffer to a multiple of 4, so it costs what
  dense costs); the ablations `uniform` (uniform dispatch and combine) and `identity` (slot i = token i) at the
  `softmoe_p1` size; `tokens_choice_k2` (top-2, 2x the expert FLOPs) reported apart; `dense_wide` (calibration);
  `softmoe_p1_vmoe_experts` (the library's default expert init, one shared xavier draw, in this timm-initialised
  tower). FLOPs and parameters come from `mmsoftmoe.models.accounting` and are printed per variant.
- Initialisation (`--init`): "timm" (default) draws every MLP and every expert alike (timm's N(0, 0.02^2), experts
  `expert_init="independent"`), so variants differ by their layer, not their init. vmoe's xavier experts inside
  timm's tower halve what Soft MoE learns in 300 steps (14% vs 27% on the 256-glyph identity task), and vmoe's init
  throughout (`--init vmoe`, timm's `weight_init="jax"`) slows every variant (dense 4% vs 26%).
- Statistics: per seed the difference to dense (same data stream, same held-out set), their mean and standard error
  (sample std / sqrt(seeds)); a claim is judged at two standard errors.
- Routing check: per variant at the end of training, combine entropy relative to its maximum log(n p) and `scale`
  (Soft MoE), dropped fraction (Tokens Choice), processed fraction (Experts Choice), averaged over MoE layers.
  `--router-lr-mult` multiplies the learning rate of the routers' parameters (Soft MoE `phi` and `scale`, the sparse
  gates): a declared deviation from the paper (same lr everywhere), default 1.

Optimisation (shared by every variant): AdamW (`training.optim.build_optimizer`, the layers' no-decay rules),
lr 2e-3, weight decay 0.03 (the paper's), betas (0.9, 0.999), cosine schedule with 5% warmup
(`training.optim.lr_multiplier`), 800 steps of batch 64 (`--quick`: 100 steps, 2 seeds, 2k held-out); the sparse
layers' aux losses are added as they declare them. `--jobs N` runs (variant, seed) pairs as N concurrent processes
of this module with cores / N threads each (on 2 cores, `--jobs 2`: two 1-thread processes train ~1.4x faster than
one 2-thread process); on a GPU, `--device cuda --jobs 8`.
Outputs: `<out>/study.json`, `study.md`, `study.png` (quality vs FLOPs per image).

Results (`benchmarks/results/study/`: `--jobs 2`, 800 x 64, 3 seeds, 10k held-out, 52.8 min on 2 cores, load 1.4-3.2).
Top-3 recall, dense 48.7%; paired differences to dense: Soft MoE 64E x 1 +2.5 ± 1.7 points, 16E x 4 +0.8 ± 1.1,
Experts Choice +14.9 ± 2.2, Tokens Choice k=1 +3.4 ± 1.4 (k=2 +2.9 ± 1.4), uniform +2.5 ± 1.4, identity -2.7 ± 1.1,
4x-wide muP -2.4 ± 1.4, Soft MoE with vmoe's shared xavier experts -18.9 ± 2.4.
- The calibration fails: the 4x-wide MLP does not beat dense within 800 steps (curves at 100..500 steps show it
  stuck near the label prior's loss while dense climbs), so the task does not reward extra *MLP width* at this budget.
  It does reward parameters behind hard routing: Experts Choice (each of 64 experts takes the one token of the image
  it scores highest, so the 3 glyph patches among 61 background ones get experts of their own) wins by 15 points.
- Soft MoE > identity holds (+5.2 ± 1.5); Soft MoE > dense, > Tokens Choice, > 16E x 4 and > uniform are within two
  standard errors; Soft MoE > Experts Choice is reversed (-12.4 ± 1.5).
- Routing stays near uniform (scale 1.22, combine entropy 0.988 of its maximum), and learned - uniform is
  -0.07 ± 1.11 points: at this budget Soft MoE is its uniform ablation. Not because the router cannot move: under
  Adam `scale` can travel about lr x steps (0.8 here) and moved 0.2; with `--router-lr-mult 10` (reach 8) it moved
  1.7 (entropy 0.94; recall -1.8 ± 1.9 vs x1), with `--router-lr-mult 100` (reach 80) 3.1 (entropy 0.88; recall
  -3.2 ± 1.5 vs x1, -3.2 ± 0.6 vs uniform). The loss does not pull the soft routing sharp within 800 steps, and
  forcing it sharper costs quality; the paper's gain comes after 300k steps on JFT, far beyond a CPU budget
  (`benchmarks/results/study/router_lr_10.json`, `router_lr_100.json`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import check_machine, write_results
from mmsoftmoe.data.glyphs import GlyphTask, top_k_recall
from mmsoftmoe.layers import collect_aux_loss, collect_routing_stats, routed_layers, set_record_stats
from mmsoftmoe.models.accounting import image_flops, parameter_counts
from mmsoftmoe.models.mmsoftmoe_vit import MODEL_ARGS
from mmsoftmoe.models.vit import MoEVisionTransformer
from mmsoftmoe_training.optim import build_optimizer, lr_multiplier

TOWER = "dense_vit_micro_patch4_32"  # m = 64 tokens: the matched MoEs use n * p = 64 expert rows per image
HELD_OUT_SEED = 1_000_003  # the evaluation stream; training streams use the run seeds
MOE_BLOCKS = "last_half"


@dataclass(frozen=True)
class Variant:
    label: str
    group: str  # "matched" (dense FLOPs), "ablation" (dense FLOPs), "2x cost", "calibration"
    moe_layer: str = "dense"
    moe_kwargs: dict = field(default_factory=dict)
    mlp_ratio: float = 4.0


_SOFT_P1 = dict(num_experts=64, slots_per_expert=1)
_SPARSE = dict(num_experts=64, capacity_factor=1.0, capacity_multiple_of=1)
VARIANTS = {
    "dense": Variant("Dense ViT", "matched"),
    "softmoe_p1": Variant("Soft MoE 64E x 1 slot", "matched", "soft", _SOFT_P1),
    "softmoe_e16_s4": Variant("Soft MoE 16E x 4 slots", "matched", "soft", dict(num_experts=16, slots_per_expert=4)),
    "experts_choice": Variant("Experts Choice 64E", "matched", "experts_choice",
                              dict(num_experts=64, capacity_factor=1.0)),
    "tokens_choice_k1": Variant("Tokens Choice 64E k=1", "matched", "tokens_choice", dict(_SPARSE, top_k=1)),
    "uniform": Variant("Soft MoE 64E, uniform dispatch+combine", "ablation", "soft",
                       dict(_SOFT_P1, dispatch="uniform", combine="uniform")),
    "identity": Variant("Soft MoE 64E, identity dispatch+combine", "ablation", "soft",
                        dict(_SOFT_P1, dispatch="identity", combine="identity")),
    "tokens_choice_k2": Variant("Tokens Choice 64E k=2 (2x expert FLOPs)", "2x cost", "tokens_choice",
                                dict(_SPARSE, top_k=2)),
    "dense_wide": Variant("Dense ViT, 4x wider MLP, muP (calibration)", "calibration", mlp_ratio=16.0),
    "softmoe_p1_vmoe_experts": Variant("Soft MoE 64E x 1, experts one shared xavier draw (vmoe)", "init",
                                       "soft", dict(_SOFT_P1, expert_init="vmoe")),
}
# The paper's claims as (better, worse) pairs: Table 2 / Figure 3 at equal cost, Table 3's routing ablation, and the
# calibration of the task.
CLAIMS = [("dense_wide", "dense"), ("softmoe_p1", "dense"), ("softmoe_p1", "experts_choice"),
          ("softmoe_p1", "tokens_choice_k1"), ("softmoe_p1", "tokens_choice_k2"), ("softmoe_p1", "softmoe_e16_s4"),
          ("softmoe_p1", "uniform"), ("softmoe_p1", "identity"), ("uniform", "dense"), ("identity", "dense"),
          ("softmoe_p1", "softmoe_p1_vmoe_experts")]


@dataclass(frozen=True)
class Budget:
    steps: int
    batch_size: int
    seeds: tuple[int, ...]
    held_out: int
    variants: tuple[str, ...]
    lr: float = 2e-3
    weight_decay: float = 0.03
    router_lr_mult: float = 1.0
    num_glyphs: int = 64
    num_classes: int | None = None  # None: every glyph its own class
    glyphs_per_image: int = 3
    glyph_size: int = 6
    grid: int = 1
    noise_std: float = 0.2
    init: str = "timm"
    device: str = "cpu"

    def task(self) -> GlyphTask:
        return GlyphTask(num_glyphs=self.num_glyphs, num_classes=self.num_classes,
                         glyphs_per_image=self.glyphs_per_image, glyph_size=self.glyph_size, grid=self.grid,
                         noise_std=self.noise_std)


BASE_MLP_RATIO = 4.0
INITS = ("timm", "vmoe")


def build_tower(variant: str, num_classes: int, init: str = "timm") -> MoEVisionTransformer:
    """The micro tower with `variant`'s MLPs in the last half of the blocks and a `num_classes` head.

    `init` "timm": timm's ViT init everywhere and experts drawn like the dense MLPs they replace (`expert_init=
    "independent"`: truncated normal, std 0.02), so every variant's MLPs start alike. "vmoe": the reference's init
    throughout (timm's `weight_init="jax"`: xavier-uniform kernels, N(0, 1e-6) MLP biases, zero head; experts one
    shared xavier draw, `expert_init="vmoe"`). A wider MLP (calibration) has its second matrix scaled by
    1/sqrt(width multiplier) at init (muP, Yang et al. 2021) and its learning rate by 1/multiplier (`lr_multipliers`).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    v = VARIANTS[variant]
    kwargs = dict(MODEL_ARGS[TOWER], mlp_ratio=v.mlp_ratio, num_classes=num_classes)
    if init == "vmoe":
        kwargs["weight_init"] = "jax"
    if v.moe_layer != "dense":
        moe_kwargs = {"expert_init": "independent" if init == "timm" else "vmoe", **v.moe_kwargs}
        kwargs.update(moe_layer=v.moe_layer, moe_blocks=MOE_BLOCKS, moe_kwargs=moe_kwargs)
    model = MoEVisionTransformer(**kwargs)
    if v.mlp_ratio != BASE_MLP_RATIO:
        with torch.no_grad():
            for block in model.blocks:
                block.mlp.fc2.weight.mul_((v.mlp_ratio / BASE_MLP_RATIO) ** -0.5)
    return model


def router_parameters(model: nn.Module) -> set[str]:
    """Names of the routers' parameters: everything of a routed layer that is not an expert."""
    return {f"{name}.{p}" for name, layer in routed_layers(model).items()
            for p, _ in layer.named_parameters() if not p.startswith("experts.")}


def lr_multipliers(model: nn.Module, variant: str, router_lr_mult: float = 1.0) -> dict[str, float]:
    """Per parameter name, its learning-rate multiplier where it is not 1: the routers' (`--router-lr-mult`, a
    declared deviation) and a wider MLP's second matrix (muP's 1/width multiplier under Adam)."""
    mults = {name: router_lr_mult for name in router_parameters(model)} if router_lr_mult != 1.0 else {}
    width = VARIANTS[variant].mlp_ratio / BASE_MLP_RATIO
    if width != 1.0:
        mults.update({f"blocks.{i}.mlp.fc2.weight": 1.0 / width for i in range(len(model.blocks))})
    return mults


def build_optimizer_with_lr_mults(model: nn.Module, lr: float, weight_decay: float,
                                  lr_mults: dict[str, float]) -> torch.optim.AdamW:
    """`build_optimizer`'s AdamW (its no-decay rules), split into groups by `lr_mult` (1 where not named)."""
    opt = build_optimizer(model, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    mult_of = {id(p): lr_mults.get(n, 1.0) for n, p in model.named_parameters()}
    unknown = sorted(set(lr_mults) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ValueError(f"lr multipliers for parameters the model does not have: {unknown}")
    groups = []
    for group in opt.param_groups:
        for mult in sorted({mult_of[id(p)] for p in group["params"]}):
            groups.append({"params": [p for p in group["params"] if mult_of[id(p)] == mult],
                           "weight_decay": group["weight_decay"], "lr_mult": mult})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def routing_check(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Routing statistics of one forward, averaged over MoE layers; combine entropy relative to log(n p)."""
    set_record_stats(model, True)
    with torch.no_grad():
        model.eval()(images)
    stats = collect_routing_stats(model, prefix="")
    out: dict[str, float] = {}
    for key in ("scale", "dropped_fraction", "processed_fraction"):
        values = [v for k, v in stats.items() if k.endswith(f"/{key}")]
        if values:
            out[key] = statistics.fmean(values)
    entropies = [stats[f"/{n}/combine_entropy"] / math.log(layer.num_slots)
                 for n, layer in routed_layers(model).items() if f"/{n}/combine_entropy" in stats]
    if entropies:
        out["combine_entropy_rel"] = statistics.fmean(entropies)
    return out


def train_one(variant: str, seed: int, budget: Budget, task: GlyphTask) -> dict:
    """Train one tower on stream `seed`; held-out top-k recall, routing check, wall time."""
    torch.manual_seed(seed)
    device = torch.device(budget.device)
    model = build_tower(variant, task.num_classes, budget.init).to(device)
    with torch.no_grad():  # start at the label prior k / g, so the first steps do not just learn the bias
        model.head.bias.fill_(math.log(task.glyphs_per_image / (task.num_classes - task.glyphs_per_image)))
    set_record_stats(model, False)
    opt = build_optimizer_with_lr_mults(model, budget.lr, budget.weight_decay,
                                        lr_multipliers(model, variant, budget.router_lr_mult))
    warmup = max(1, budget.steps // 20)
    start = time.perf_counter()
    model.train()
    for step in range(budget.steps):
        mult = lr_multiplier(step, schedule="cosine", total_steps=budget.steps, warmup_steps=warmup)
        for group in opt.param_groups:
            group["lr"] = budget.lr * mult * group["lr_mult"]
        images, labels, _ = task.batch(seed, step, budget.batch_size)
        logits = model(images.to(device, non_blocking=True))
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.to(device), reduction="sum")
        loss = loss / labels.shape[0]  # per image, summed over classes (big_vision's sigmoid_xent)
        aux = collect_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        (loss if aux is None else loss + aux).backward()
        opt.step()
    train_s = time.perf_counter() - start
    images, labels = task.held_out(HELD_OUT_SEED, budget.held_out)
    model.eval()
    with torch.no_grad():
        recall = torch.cat([top_k_recall(model(x.to(device)).float().cpu(), y)
                            for x, y in zip(images.split(1000), labels.split(1000), strict=True)])
    return {"seed": seed, "recall": float(recall.mean()), "final_train_loss": loss.item(),
            "routing": routing_check(model, images[:256].to(device)), "train_s": train_s,
            "loadavg_1min": os.getloadavg()[0]}


def cost(variant: str, num_classes: int) -> dict:
    """Forward FLOPs per image and parameter counts of `variant`'s tower, from the accounting module."""
    model = build_tower(variant, num_classes)
    return {"flops_per_image": image_flops(model, (32, 32)), **parameter_counts(model, model)}


def paired(values: list[float], baseline: list[float]) -> dict:
    """Mean of the per-seed differences and its standard error (None with one seed); verdict at 2 SE."""
    diffs = [a - b for a, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"diff": mean, "se": None, "verdict": "one seed: no spread to judge by"}
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    verdict = "holds" if mean > 2 * se else "reversed" if mean < -2 * se else "within 2 SE: not shown"
    return {"diff": mean, "se": se, "verdict": verdict}


def run_all(budget: Budget, jobs: int) -> dict[str, list[dict]]:
    """Every (variant, seed): in this process one at a time, or as `jobs` concurrent worker processes."""
    pairs = [(v, s) for s in budget.seeds for v in budget.variants]  # seeds outside: load drifts hit all alike
    if jobs <= 1:
        task = budget.task()
        results = []
        for v, s in pairs:
            print(f"[study] {v} seed {s}", file=sys.stderr, flush=True)
            results.append(train_one(v, s, budget, task))
    else:
        # On CPU the workers share the cores: one thread each unless cores are left over (2 small single-threaded
        # processes train ~1.4x faster than one 2-thread process on 2 cores, measured for the micro tower).
        threads = max(1, (os.cpu_count() or 1) // jobs)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

        def launch(pair: tuple[str, int]) -> dict:
            print(f"[study] {pair[0]} seed {pair[1]}", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "benchmarks.study", "--worker", json.dumps([asdict(budget), *pair])]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"study worker {pair} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
            return json.loads(done.stdout)

        with ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(launch, pairs))
    runs: dict[str, list[dict]] = {v: [] for v in budget.variants}
    for (v, _), r in zip(pairs, results, strict=True):
        runs[v].append(r)
    return runs


def summarize(budget: Budget, runs: dict[str, list[dict]]) -> dict:
    variants = {}
    base = [r["recall"] for r in runs["dense"]] if "dense" in runs else None
    for v, rs in runs.items():
        recalls = [r["recall"] for r in rs]
        routing = {k: statistics.fmean(r["routing"][k] for r in rs) for k in rs[0]["routing"]}
        variants[v] = {"label": VARIANTS[v].label, "group": VARIANTS[v].group,
                       **cost(v, budget.num_classes or budget.num_glyphs),
                       "recall_mean": statistics.fmean(recalls), "runs": rs, "routing": routing,
                       "train_s_mean": statistics.fmean(r["train_s"] for r in rs),
                       "vs_dense": paired(recalls, base) if base is not None else None}
    claims = [{"better": a, "worse": b, **paired([r["recall"] for r in runs[a]], [r["recall"] for r in runs[b]])}
              for a, b in CLAIMS if a in runs and b in runs]
    return {"variants": variants, "claims": claims}


def _fmt_se(p: dict | None) -> str:
    if p is None:
        return ""
    return f"{100 * p['diff']:+.2f}" + ("" if p["se"] is None else f" ± {100 * p['se']:.2f}")


def routing_text(routing: dict) -> str:
    names = {"combine_entropy_rel": "H(combine)/max", "scale": "scale", "dropped_fraction": "dropped",
             "processed_fraction": "processed"}
    return ", ".join(f"{names[k]} {v:.3f}" for k, v in routing.items() if k in names) or "-"


def markdown(report: dict) -> str:
    b, s = report["budget"], report["summary"]
    classes = b["num_classes"] or b["num_glyphs"]
    lines = [f"# Small-scale study: glyph task ({b['num_glyphs']} glyphs of {b['glyph_size']} px in {classes} classes, "
             f"{b['glyphs_per_image']} per image, offsets on a {b['grid']} px grid, noise {b['noise_std']}), "
             f"{b['steps']} steps x batch {b['batch_size']}, seeds {b['seeds']}", "",
             f"AdamW lr {b['lr']}, weight decay {b['weight_decay']}, cosine; init {b['init']}.", "",
             f"Held-out {b['held_out']} images; metric top-k recall (%); differences paired by seed "
             f"(mean ± SE over seeds). Router lr multiplier {b['router_lr_mult']}. Device {b['device']}; wall "
             f"{report['wall_s'] / 60:.1f} min; load before {report['load_before']['loadavg_1_5_15']}, "
             f"after {report['load_after']['loadavg_1_5_15']}.",
             "", "| variant | group | GFLOPs/img | params total | recall % | vs dense (points) | routing | train s |",
             "|" + " --- |" * 8]
    for r in s["variants"].values():
        lines.append(f"| {r['label']} | {r['group']} | {r['flops_per_image'] / 1e9:.4f} | {r['total'] / 1e6:.2f}M | "
                     f"{100 * r['recall_mean']:.2f} | {_fmt_se(r['vs_dense'])} | {routing_text(r['routing'])} | "
                     f"{r['train_s_mean']:.0f} |")
    lines += ["", "## The paper's claims at this scale (A > B, paired difference ± SE, judged at 2 SE)", ""]
    lines += [f"- {c['better']} > {c['worse']}: {_fmt_se(c)} points: {c['verdict']}" for c in s["claims"]]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path:
    """Held-out recall against forward GFLOPs per image, one point per variant (paired SE vs dense as bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmsoftmoe.figures import save_figure

    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(summary["variants"].values()):
        se = (r["vs_dense"] or {}).get("se") or 0.0
        ax.errorbar(r["flops_per_image"] / 1e9, 100 * r["recall_mean"], yerr=100 * se, capsize=3, marker="o",
                    color=f"C{i % 10}", label=r["label"])
    ax.set(xlabel="forward GFLOPs per image (counted)", ylabel="held-out top-k recall (%)",
           title="Quality vs cost (bars: paired SE of the difference to dense)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path, dpi=120)


def parse_args(argv: list[str] | None) -> tuple[Budget, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few steps, 2 seeds, small held-out set")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --quick 0,1)")
    parser.add_argument("--held-out", type=int, default=None, help="held-out images (default 10000)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--router-lr-mult", type=float, default=1.0, help="declared deviation: router lr multiplier")
    parser.add_argument("--num-glyphs", type=int, default=256)
    parser.add_argument("--glyphs-per-image", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=16,
                        help="glyphs dealt into this many classes (0: every glyph its own class)")
    parser.add_argument("--glyph-size", type=int, default=4)
    parser.add_argument("--grid", type=int, default=4, help="glyph offsets are multiples of this (pixels; 1: anywhere)")
    parser.add_argument("--noise-std", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--init", choices=INITS, default="timm",
                        help="timm: every MLP and expert drawn alike (default); vmoe: the reference's init throughout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1, help="concurrent worker processes, each with cores / N threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/study"))
    args = parser.parse_args(argv)
    variants = tuple(args.variants.split(","))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = args.seeds or ("0,1" if args.quick else "0,1,2")
    budget = Budget(steps=args.steps or (100 if args.quick else 800), batch_size=args.batch_size,
                    seeds=tuple(int(s) for s in seeds.split(",")),
                    held_out=args.held_out or (2000 if args.quick else 10000), variants=variants,
                    router_lr_mult=args.router_lr_mult, num_glyphs=args.num_glyphs,
                    num_classes=args.num_classes or None,
                    glyphs_per_image=args.glyphs_per_image, glyph_size=args.glyph_size, grid=args.grid,
                    noise_std=args.noise_std, lr=args.lr, init=args.init, device=args.device)
    return budget, args


def worker(spec: str) -> None:
    """One (variant, seed) run for `run_all`'s process pool; prints its result as JSON."""
    budget_dict, variant, seed = json.loads(spec)
    budget = Budget(**{**budget_dict, "seeds": tuple(budget_dict["seeds"]),
                       "variants": tuple(budget_dict["variants"])})
    print(json.dumps(train_one(variant, seed, budget, budget.task())))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker(argv[1])
        return {}
    budget, args = parse_args(argv)
    load, warning = check_machine()
    start = time.perf_counter()
    runs = run_all(budget, args.jobs)
    report = {"budget": asdict(budget), "summary": summarize(budget, runs), "wall_s": time.perf_counter() - start,
              "load_before": load, "load_warning": warning, "threads": torch.get_num_threads(),
              "torch_version": torch.__version__}
    write_results(report, "", args.out / "study.json")  # the load after joins the report before the markdown
    (args.out / "study.md").write_text(markdown(report))
    plot(report["summary"], args.out / "study.png")
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
