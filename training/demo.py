"""`mmsoftmoe demo` (what `make demo` runs): pretrain on the built-in data, evaluate, export, print a results table.

Everything runs offline on CPU: the demo config trains the mini Soft MoE CLIP on generated shapes; evaluation
uses the held-out shapes split and scikit-learn's bundled digits; export writes every format and checks parity.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eval.main import run_evaluation
from mmsoftmoe.data import transforms_from_preprocess_cfg
from mmsoftmoe.export import export_checkpoint
from mmsoftmoe.models.clip import load_clip
from training.config import load_config
from training.main import fit

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
    for dataset, result in evals.items():
        if "zeroshot" in result:
            rows.append((dataset, "zero-shot top-1", f"{result['zeroshot']['acc1']:.3f}"))
        if "fewshot" in result:
            ten = result["fewshot"]["10shot"]
            rows.append((dataset, "10-shot ridge top-1 (mean ± std, 3 seeds)",
                         f"{ten['acc1']:.3f} ± {ten['acc1_std']:.3f}"))
        if "linprobe" in result:
            rows.append((dataset, "logistic probe top-1", f"{result['linprobe']['acc1']:.3f}"))
        if "retrieval" in result:
            r = result["retrieval"]
            rows.append((dataset, "image->text / text->image R@1",
                         f"{r['text_retrieval_recall@1']:.3f} / {r['image_retrieval_recall@1']:.3f}"))
    for name, report in exports.items():
        rows.append(("export", f"{name}: max abs diff vs eager", f"{report['parity']['max_abs_diff']:.2g}"))
    rows += [("time", f"{k} (s)", f"{v:.0f}") for k, v in seconds.items()]
    width = max(len(r[1]) for r in rows)
    lines = [f"| {'what':<8} | {'measure':<{width}} | value |", f"|{'-' * 10}|{'-' * (width + 2)}|-------|"]
    lines += [f"| {a:<8} | {b:<{width}} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def training_summary(output_dir: Path, steps: int) -> dict:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    speeds = sorted(r["samples_per_s"] for r in records if "samples_per_s" in r)
    return {"steps": steps, "first_loss": losses[0], "last_loss": losses[-1], "samples_per_s": speeds[len(speeds) // 2]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmsoftmoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo", help="a shipped run config by name, or a YAML file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, ["resume=none", *args.overrides])
    out = Path(cfg.output_dir)
    seconds = {}
    start = time.perf_counter()
    fit(cfg)
    seconds["pretraining"] = time.perf_counter() - start
    start = time.perf_counter()
    evals = evaluate(out / "final", out / "eval")
    seconds["evaluation"] = time.perf_counter() - start
    start = time.perf_counter()
    exports = export_checkpoint(out / "final", "all", out / "export", overwrite=True)
    seconds["export (all formats, parity-checked)"] = time.perf_counter() - start
    table = results_table(training_summary(out, cfg.steps), evals, exports, seconds)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwritten: {out}/results.md, {out}/training.png, {out}/eval/, {out}/export/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
