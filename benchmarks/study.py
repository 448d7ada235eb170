"""The paper's comparison at small scale: quality against training cost of Soft MoE, sparse MoE and dense towers.

Run as `python -m benchmarks.study [--size micro] [--steps N] [--batch-size B] [--seeds 0,1,2] [--variants a,b]
[--out benchmarks/results/study] [key=value ...]`; the key=value pairs are extra run-config
overrides, e.g. `python -m benchmarks.study --size mini precision=bf16` on a GPU. Issue 6; SPEC sections 2 and 3.

Puigcerver et al. 2024 compare towers at equal training budget (Table 2, Figure 3) and ablate Soft MoE's routing
(section 5, Table 3). This runner repeats both with CLIP models that differ only in the MLPs of the last half of the
image tower's blocks (text tower, width, depth, data, steps, batch and learning-rate schedule are shared):

- `dense`: the dense ViT. `softmoe`: Soft MoE with n * p = m slots (micro: 16 experts x 4 slots for 64 tokens),
  the dense MLP's cost. `softmoe_p1`: the paper's one slot per expert (a quarter of those slots).
  `tokens_choice_k1`, `tokens_choice_k2`, `experts_choice`: the sparse baselines, capacity factor 1 (top-2 fills
  twice the expert buffer rows).
- Routing ablations at the `softmoe` size: `soft_uniform` (soft dispatch, uniform combine), `uniform_soft`,
  `uniform_uniform`, `identity` (slot i = token i, which needs n * p = m).

Every variant trains under one fixed budget and is evaluated by the trainer's final evaluation
(`training.main.fit`): zero-shot top-1 and the 10-shot ridge probe on the built-in shapes. Nothing is tuned per
variant and the result is reported as measured (the shapes test split has 500 images, so one run's top-1 carries
about 2 points of sampling error besides the seed spread). Per variant the JSON holds, over seeds (the seed sets
initialisation and data order): every run's numbers, mean, sample std (0 for one seed), min and max. Training cost
is measured twice: wall-clock seconds per step (from the run's `metrics.jsonl` throughput records, the first logged
interval dropped as warm-up) and the image tower's forward FLOPs per image counted by
`torch.utils.flop_counter.FlopCounterMode` (matmuls as executed: a sparse MoE's empty buffer rows and an ablation's
uniform weights count); training FLOPs are taken as 3x forward. A claim of the paper (A beats B) is judged at two
standard errors of the difference of seed means.

Towers are registered timm names (`mmsoftmoe_vit`); the CLIP configs are the size's dense config with the tower
swapped, written to `<out>/model_configs/` and registered with open_clip, so every run's `final/` folder loads with
`mmsoftmoe.models.clip.load_clip` (its config travels inside it). Outputs: `<out>/study.json`, `study.md` (tables
like Table 2 and Table 3, and the paper's pairwise claims checked against the seed spread), `study.png` (like Figure
3), `runs/<variant>/seed<k>/`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch

from benchmarks.layer_bench import check_machine, machine_load
from eval.report import write_json
from mmsoftmoe.models.accounting import count_flops, count_parameters
from mmsoftmoe.models.clip import get_clip_config, load_clip
from mmsoftmoe.models.mmsoftmoe_vit import TOWERS, matched_slots_per_expert
from training.config import load_config, to_dict
from training.logger import read_metrics
from training.main import fit

TRAIN_FLOP_FACTOR = 3  # forward + backward = 3x forward
FLOP_BATCH = 4  # images in the counted forward (FLOPs are per image)


@dataclass(frozen=True)
class StudySize:
    """A tower size, the CLIP config whose tower is swapped, and the default budget at that size."""

    tower: str
    base_clip: str
    steps: int
    batch_size: int
    num_workers: int  # data loader workers drawing the shapes (0: in the training process)


# micro: about 40 s per run on 2 CPU cores, so 10 variants x 3 seeds take about 20-25 minutes; mini: a GPU size.
SIZES = {
    "micro": StudySize("micro_patch4_32", "Dense-Micro-4-32", steps=250, batch_size=32, num_workers=0),
    "mini": StudySize("mini_patch8_64", "Dense-Mini-8-64", steps=3000, batch_size=256, num_workers=8),
}
# Shared by every run; learning rate and schedule as configs/smoke.yaml, warmup a tenth of the steps.
RUN_SETTINGS = ["data.source=shapes", "optim.lr=1e-3", "optim.weight_decay=0.1",
                "optim.schedule=cosine", "loss=clip", "eval.dataset=shapes", "eval.fewshot=true", "trackers=[]",
                "resume=none", "keep_checkpoints=1"]


@dataclass(frozen=True)
class Variant:
    """A tower kind: its label, its table (comparison or ablation) and its timm name pattern."""

    label: str
    group: str
    timm_pattern: str  # formatted with tower, n (experts) and p (slots per expert matching the tokens)


_MATCHED_SOFTMOE = "softmoe_vit_{tower}_e{n}_s{p}"
VARIANTS = {
    "dense": Variant("Dense ViT", "comparison", "dense_vit_{tower}"),
    "softmoe": Variant("Soft MoE (n*p = m slots)", "comparison", _MATCHED_SOFTMOE),
    "softmoe_p1": Variant("Soft MoE (p = 1)", "comparison", "softmoe_vit_{tower}_e{n}"),
    "tokens_choice_k1": Variant("Tokens Choice k=1", "comparison", "tokenschoice_vit_{tower}_e{n}_k1"),
    "tokens_choice_k2": Variant("Tokens Choice k=2", "comparison", "tokenschoice_vit_{tower}_e{n}_k2"),
    "experts_choice": Variant("Experts Choice", "comparison", "expertschoice_vit_{tower}_e{n}"),
    "soft_uniform": Variant("soft dispatch, uniform combine", "ablation", _MATCHED_SOFTMOE + "_dsoft_cuniform"),
    "uniform_soft": Variant("uniform dispatch, soft combine", "ablation", _MATCHED_SOFTMOE + "_duniform_csoft"),
    "uniform_uniform": Variant("uniform dispatch and combine", "ablation", _MATCHED_SOFTMOE + "_duniform_cuniform"),
    "identity": Variant("identity dispatch and combine", "ablation", _MATCHED_SOFTMOE + "_didentity_cidentity"),
}
# SPEC section 2: the routing ablation, S/14 with 256 experts, 300k steps, ImageNet 10-shot top-1 (%).
PAPER_ROUTING_10SHOT = {"softmoe": 74.8, "soft_uniform": 72.0, "uniform_soft": 71.8, "uniform_uniform": 70.0,
                        "identity": 69.1, "dense": 62.3}
# The paper's claim that Soft MoE beats its matched-cost rivals (Table 2, Figure 3).
SOFTMOE_RIVALS = ("dense", "tokens_choice_k1", "tokens_choice_k2", "experts_choice")
METRICS = {"zeroshot_acc1": "zeroshot/acc1", "fewshot_10shot_acc1": "fewshot/10shot/acc1"}


def timm_name(variant: str, tower: str) -> str:
    """The registered timm name of `variant`'s image tower at `tower` size."""
    experts = TOWERS[tower][1]
    return VARIANTS[variant].timm_pattern.format(tower=tower, n=experts, p=matched_slots_per_expert(tower))


def register_clip_configs(size: str, variants: list[str], folder: Path) -> dict[str, str]:
    """Write the size's dense CLIP config with each variant's tower into `folder`, register it; variant -> name."""
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for variant in variants:
        cfg = get_clip_config(SIZES[size].base_clip)
        cfg["vision_cfg"]["timm_model_name"] = timm_name(variant, SIZES[size].tower)
        names[variant] = f"Study-{size}-{variant}"
        (folder / f"{names[variant]}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(folder)
    return names


def run_overrides(args: argparse.Namespace, clip_name: str, seed: int, run_dir: Path) -> list[str]:
    """One run's config overrides; the command line's `key=value` pairs come last and win."""
    steps, tenth = args.steps, max(1, args.steps // 10)
    return [*RUN_SETTINGS, f"model.name={clip_name}", f"seed={seed}", f"output_dir={run_dir}", f"steps={steps}",
            f"batch_size={args.batch_size}", f"data.num_workers={SIZES[args.size].num_workers}",
            f"optim.warmup_steps={tenth}", f"log_every={tenth}", f"checkpoint_every={steps}",
            *args.overrides]


def seconds_per_step(records: list[dict], batch_size: int) -> float:
    """Training seconds per step from the logged throughput, the first interval (warm-up) dropped if others exist."""
    intervals, previous = [], 0
    for record in records:
        if "samples_per_s" in record:
            steps = record["step"] - previous
            intervals.append((steps, steps * batch_size / record["samples_per_s"]))
            previous = record["step"]
    timed = intervals[1:] or intervals
    return sum(t for _, t in timed) / sum(s for s, _ in timed)


def train_one(args: argparse.Namespace, clip_name: str, seed: int, run_dir: Path) -> dict:
    """One training run; its final metrics, measured step time and wall-clock."""
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # the logger appends; a rerun starts a fresh log
    cfg = load_config(None, run_overrides(args, clip_name, seed, run_dir))
    load_1min = os.getloadavg()[0]
    start = time.perf_counter()
    final = fit(cfg)
    wall_s = time.perf_counter() - start
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # optimizer state: not needed, `final/` stays
    s_per_step = seconds_per_step(read_metrics(run_dir), cfg.batch_size)
    return {"seed": seed, "output_dir": str(run_dir), **{k: final[v] for k, v in METRICS.items()},
            "s_per_step": s_per_step, "train_s": s_per_step * cfg.steps, "wall_s": wall_s,
            "loadavg_1min_before": load_1min}


@torch.no_grad()
def tower_cost(final_dir: Path) -> dict:
    """Parameters (image tower, whole CLIP) and the image tower's counted forward FLOPs per image."""
    model, _, config = load_clip(final_dir)
    size = config["preprocess_cfg"]["size"]
    height, width = (size, size) if isinstance(size, int) else size
    flops = count_flops(lambda: model.visual(torch.zeros(FLOP_BATCH, 3, height, width)))
    return {"params_tower": count_parameters(model.visual), "params_total": count_parameters(model),
            "flops_per_image": flops // FLOP_BATCH}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarize(variant: str, tower: str, clip_name: str, runs: list[dict], cost: dict, images_seen: int) -> dict:
    out = {"label": VARIANTS[variant].label, "group": VARIANTS[variant].group, "timm_model": timm_name(variant, tower),
           "clip_model": clip_name, **cost,
           "train_flops_tower": TRAIN_FLOP_FACTOR * cost["flops_per_image"] * images_seen, "runs": runs}
    for key in (*METRICS, "s_per_step", "train_s"):
        out[key] = spread([r[key] for r in runs])
    return out


def check_claim(better: dict, worse: dict, metric: str = "fewshot_10shot_acc1") -> dict:
    """The measured difference of means and a verdict at two standard errors (none with a single seed)."""
    a, b = better[metric], worse[metric]
    diff = a["mean"] - b["mean"]
    if min(a["n"], b["n"]) < 2:
        return {"diff": diff, "se": None, "verdict": "one seed: no spread to judge by"}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    verdict = "agrees" if diff > 2 * se else "contradicts" if diff < -2 * se else "within 2 SE: inconclusive"
    return {"diff": diff, "se": se, "verdict": verdict}


def claims(results: dict) -> list[dict]:
    """The paper's (better, worse) pairs among the variants run: Soft MoE against each rival, and each step of the
    routing ablation's order (Table 3)."""
    pairs = [("softmoe", rival) for rival in SOFTMOE_RIVALS if "softmoe" in results and rival in results]
    order = [k for k in PAPER_ROUTING_10SHOT if k in results]
    pairs = list(dict.fromkeys(pairs + list(zip(order[:-1], order[1:], strict=True))))
    return [{"better": a, "worse": b, **check_claim(results[a], results[b])} for a, b in pairs]


def _pct(s: dict) -> str:
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} [{100 * s['min']:.1f}, {100 * s['max']:.1f}]"


def table(results: dict, keys: list[str], paper_column: bool) -> list[str]:
    head = "| variant | tower | params (tower / CLIP) | GFLOPs/img (tower fwd) | train ms/step | train s | " \
           "zero-shot top-1 % | 10-shot top-1 % |"
    lines = [head + (" paper 10-shot % |" if paper_column else ""), "|" + " --- |" * (9 if paper_column else 8)]
    for key in keys:
        r = results[key]
        row = (f"| {r['label']} | `{r['timm_model']}` | {r['params_tower'] / 1e6:.2f}M / {r['params_total'] / 1e6:.2f}M"
               f" | {r['flops_per_image'] / 1e9:.4f} | {1e3 * r['s_per_step']['mean']:.1f} ± "
               f"{1e3 * r['s_per_step']['std']:.1f} | {r['train_s']['mean']:.1f} | {_pct(r['zeroshot_acc1'])} | "
               f"{_pct(r['fewshot_10shot_acc1'])} |")
        lines.append(row + (f" {PAPER_ROUTING_10SHOT.get(key, '')} |" if paper_column else ""))
    return lines


def markdown(report: dict) -> str:
    s, results = report["settings"], report["variants"]
    optim = s["run_config"]["optim"]
    lines = [f"# Small-scale study: {s['size']} towers, {s['steps']} steps x batch {s['batch_size']}, "
             f"seeds {s['seeds']}", "",
             f"Same budget for every variant: lr {optim['lr']}, {optim['schedule']} schedule, "
             f"{optim['warmup_steps']} warmup steps, {s['images_seen']} images seen; device "
             f"{s['device']}, {s['threads']} threads, torch {s['torch_version']}. Load before "
             f"{report['machine']['load_before']['loadavg_1_5_15']}, after "
             f"{report['machine']['load_after']['loadavg_1_5_15']}.",
             "Accuracy: mean ± sample std [min, max] over seeds; time: measured; FLOPs: counted.", ""]
    if report["machine"]["load_warning"]:
        lines += [f"**{report['machine']['load_warning']}**", ""]
    lines += ["## Tower comparison at matched cost (paper Table 2 / Figure 3)", ""]
    lines += table(results, [k for k, r in results.items() if r["group"] == "comparison"], paper_column=False)
    if any(r["group"] == "ablation" for r in results.values()):
        lines += ["", "## Soft MoE routing ablations (paper Table 3; paper: S/14 256E, ImageNet 10-shot)", ""]
        lines += table(results, [k for k in PAPER_ROUTING_10SHOT if k in results], paper_column=True)
    if report["claims"]:
        lines += ["", "## The paper's claims, measured here (10-shot top-1, difference of means ± SE)", ""]
        for c in report["claims"]:
            se = "" if c["se"] is None else f" ± {100 * c['se']:.1f}"
            lines.append(f"- {c['better']} > {c['worse']}: {100 * c['diff']:+.1f}{se} points: {c['verdict']}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> Path:
    """Accuracy (rows: 10-shot, zero-shot) against training cost (columns: tower FLOPs, seconds), std bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), squeeze=False)
    for row, (metric, name) in enumerate((("fewshot_10shot_acc1", "10-shot"), ("zeroshot_acc1", "zero-shot"))):
        for col, cost in enumerate(("flops", "seconds")):
            ax = axes[row][col]
            for i, r in enumerate(results.values()):
                x = r["train_flops_tower"] / 1e12 if cost == "flops" else r["train_s"]["mean"]
                xerr = 0.0 if cost == "flops" else r["train_s"]["std"]
                y = r[metric]
                ax.errorbar(x, 100 * y["mean"], yerr=100 * y["std"], xerr=xerr, capsize=3, color=f"C{i % 10}",
                            marker="o" if r["group"] == "comparison" else "s", label=r["label"])
            ax.set(xlabel="image-tower training TFLOPs (3x forward)" if cost == "flops" else
                   "measured training time (s)", ylabel=f"{name} top-1 (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=8)
    fig.suptitle("Quality vs training cost (mean ± std over seeds)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def settings(args: argparse.Namespace, run_config: dict) -> dict:
    """The study's arguments and one run's resolved config (runs differ only in model, seed and output_dir)."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"size": args.size, "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
            "variants": args.variants, "images_seen": args.steps * args.batch_size,
            "overrides": args.overrides, "size_config": asdict(SIZES[args.size]), "run_config": run_config,
            "device": device, "threads": torch.get_num_threads(), "torch_version": torch.__version__}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default="micro", choices=sorted(SIZES))
    parser.add_argument("--steps", type=int, help="training steps per run (default: the size's)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the size's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {list(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/study"))
    parser.add_argument("overrides", nargs="*", help="extra run-config key=value overrides (e.g. precision=bf16)")
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.steps = args.steps or size.steps
    args.batch_size = args.batch_size or size.batch_size
    args.variants = args.variants.split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Train and evaluate every variant and seed; write and return the report."""
    args = parse_args(argv)
    load_before, warning = check_machine()
    names = register_clip_configs(args.size, args.variants, args.out / "model_configs")
    first = args.out / "runs" / args.variants[0] / f"seed{args.seeds[0]}"
    run_config = to_dict(load_config(None, run_overrides(args, names[args.variants[0]], args.seeds[0], first)))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for seed in args.seeds:  # seeds outside, variants inside: a change of machine load hits every variant alike
        for variant in args.variants:
            print(f"[study] {variant} seed {seed}", file=sys.stderr, flush=True)
            runs[variant].append(train_one(args, names[variant], seed, args.out / "runs" / variant / f"seed{seed}"))
    tower = SIZES[args.size].tower
    results = {v: summarize(v, tower, names[v], runs[v], tower_cost(Path(runs[v][0]["output_dir"]) / "final"),
                            args.steps * args.batch_size) for v in args.variants}
    report = {"settings": settings(args, run_config), "variants": results, "claims": claims(results),
              "machine": {"load_before": load_before, "load_after": machine_load(measure_busy=False),
                          "load_warning": warning}}
    write_json(report, args.out / "study.json")
    (args.out / "study.md").write_text(markdown(report))
    plot(results, args.out / "study.png")
    print(markdown(report))
    print(f"wrote {args.out}/study.json, study.md, study.png")
    return report


if __name__ == "__main__":
    main()
