"""`mmsoftmoe demo` (what `make demo` runs): pretrain on the built-in data, evaluate, export, print a results table.

Everything runs offline on CPU: the demo config trains the mini Soft MoE CLIP on generated shapes; evaluation
uses the held-out shapes split and scikit-learn's bundled digits; export writes every format and checks parity.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from mmsoftmoe.data import transforms_from_preprocess_cfg
from mmsoftmoe.export import export_checkpoint
from mmsoftmoe.machine import describe_machine
from mmsoftmoe.models.clip import load_clip
from mmsoftmoe_eval.protocol import EVALUATORS
from mmsoftmoe_eval.runner import run_evaluation
from mmsoftmoe_training.config import TrainConfig, load_config
from mmsoftmoe_training.logger import read_metrics
from mmsoftmoe_training.main import fit

# Priors of the whole-job ETA: what `make demo` measured on a 2-core machine whose fp32 GEMM peak measured 116
# GFLOP/s (2026-12-03: 266 samples/s, evaluation 10 s, export 10 s). Other machines scale them by their own measured
# peak; after each phase the clock rescales the rest by how far off the estimate was.
REFERENCE = {"gemm_peak_gflops": 116.0, "samples_per_s": 266.0, "evaluation_s": 10.0, "export_s": 10.0}
EVAL_PLAN = {"shapes": ("zeroshot", "retrieval", "fewshot", "linprobe"), "digits": ("zeroshot", "fewshot", "linprobe")}


def evaluate(final_dir: Path, out_dir: Path) -> dict:
    model, tokenizer, config = load_clip(final_dir)
    _, eval_tf = transforms_from_preprocess_cfg(config["preprocess_cfg"])
    results = {}
    for dataset, tasks in EVAL_PLAN.items():
        results.update(run_evaluation(model, tokenizer, dataset=dataset, tasks=tasks, preprocess=eval_tf,
                                      batch_size=128, shots=(1, 5, 10, 25), out_dir=out_dir / dataset))
    return results


def results_table(train: dict, evals: dict, exports: dict, seconds: dict) -> str:
    rows = [("training", "samples/s (median of logged intervals)", f"{train['samples_per_s']:.1f}"),
            ("training", f"loss, first -> last logged (of {train['steps']} steps)",
             f"{train['first_loss']:.3f} -> {train['last_loss']:.3f}")]
    for dataset, result in evals.items():  # each evaluator declares its own rows
        rows += [(dataset, measure, value) for task, evaluator in EVALUATORS.items() if task in result
                 for measure, value in evaluator.rows(result[task])]
    for name, report in exports.items():
        rows.append(("export", f"{name}: max abs diff vs eager", f"{report['parity']['max_abs_diff']:.2g}"))
    rows += [("time", f"{k} (s)", f"{v:.0f}") for k, v in seconds.items()]
    width = max(len(r[1]) for r in rows)
    lines = [f"| {'what':<8} | {'measure':<{width}} | value |", f"|{'-' * 10}|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:<8} | {b:<{width}} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def training_summary(output_dir: Path, steps: int) -> dict:
    records = read_metrics(output_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    speeds = sorted(r["samples_per_s"] for r in records if "samples_per_s" in r)
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "samples_per_s": speeds[len(speeds) // 2]}


class JobClock:
    """Wall time per phase, and an estimate of the whole job's remaining time printed at each phase.

    Estimates start from `REFERENCE` scaled by this machine's measured GEMM peak; after each phase, the later
    phases' estimates are scaled by how much faster or slower that phase ran than estimated.
    """

    def __init__(self, estimates: dict[str, float]) -> None:
        self.estimates, self.seconds, self.start = dict(estimates), {}, time.perf_counter()

    def later_phases(self, name: str) -> list[str]:
        names = list(self.estimates)
        return names[names.index(name) + 1:]

    def remaining(self, after: str) -> float:
        """Estimated seconds of the phases after `name`."""
        return sum(self.estimates[n] for n in self.later_phases(after))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        number = len(self.estimates) - len(self.later_phases(name))
        to_go = self.estimates[name] + self.remaining(name)
        print(f"[demo {number}/{len(self.estimates)}] {name}: {time.perf_counter() - self.start:.0f} s elapsed, "
              f"whole job ~{to_go:.0f} s to go", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        factor = self.seconds[name] / max(self.estimates[name], 1e-9)
        for later in self.later_phases(name):
            self.estimates[later] *= factor


def phase_estimates(cfg: TrainConfig, peak_gflops: float) -> dict[str, float]:
    """Expected seconds of each phase on a machine with this GEMM peak (`REFERENCE` scaled by the peak)."""
    scale = REFERENCE["gemm_peak_gflops"] / peak_gflops
    train = cfg.steps * cfg.batch_size / REFERENCE["samples_per_s"]
    return {"pretraining": train * scale, "evaluation": REFERENCE["evaluation_s"] * scale,
            "export": REFERENCE["export_s"] * scale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmsoftmoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a shipped run config by name, or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["resume=none", *args.overrides])
    out = Path(cfg.output_dir)
    machine = describe_machine()
    clock = JobClock(phase_estimates(cfg, machine["gemm_peak_gflops_fp32"]))
    with clock.phase("pretraining"):
        fit(cfg, desc=f"demo 1/3 pretraining (then ~{clock.remaining('pretraining'):.0f} s)")
    with clock.phase("evaluation"):
        evals = evaluate(out / "final", out / "eval")
    with clock.phase("export"):
        exports = export_checkpoint(out / "final", "all", out / "export", overwrite=True)
    seconds = {**clock.seconds, "whole job": time.perf_counter() - clock.start}
    table = results_table(training_summary(out, cfg.steps), evals, exports, seconds)
    footer = (f"machine: {machine['cores']} cores ({machine['cpu']}), {machine['torch_threads']} torch threads, "
              f"measured fp32 GEMM peak {machine['gemm_peak_gflops_fp32']:.0f} GFLOP/s")
    (out / "results.md").write_text(f"{table}\n\n{footer}\n")
    print(f"\n{table}\n\n{footer}\nwritten: {out}/results.md, {out}/training.png, {out}/eval/, {out}/export/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
