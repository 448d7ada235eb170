"""Run logs: JSONL metrics per logged step, accelerate's trackers (TensorBoard), and a loss plot at the end."""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from mmsoftmoe.figures import save_figure

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run's `metrics.jsonl`, one dict per logged step (none if the run logged nothing yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Appends one JSON object per logged step to `metrics.jsonl` and forwards it to accelerate's trackers."""

    def __init__(self, accelerator: Accelerator, output_dir: str | Path) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append `metrics` as step `step`'s record; nothing for an empty dict (a step that logged nothing)."""
        if not metrics or not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.accelerator.log(metrics, step=step)

    def read(self) -> list[dict]:
        return read_metrics(self.output_dir)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (a resumed run rewrites the steps after its checkpoint)."""
        if self.accelerator.is_main_process and self.path.is_file():
            kept = [r for r in self.read() if r["step"] <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_training(records: list[dict], path: str | Path) -> Path | None:
    """Loss and zero-shot accuracy against step, and the learning rate below (PNG), if there is anything to plot."""
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if not losses:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [(r["step"], r["zeroshot/acc1"]) for r in records if "zeroshot/acc1" in r]
    lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1))
    ax.plot(*zip(*losses, strict=True), label="train loss", color="tab:blue")
    ax.set_ylabel("loss")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals, strict=True), "o-", color="tab:orange", label="zero-shot top-1")
        ax2.set_ylabel("zero-shot top-1")
        ax2.set_ylim(0, 1)
    if lrs:
        ax_lr.plot(*zip(*lrs, strict=True), color="tab:green")
    ax_lr.set(xlabel="step", ylabel="learning rate")
    fig.legend(loc="upper center", ncol=2)
    return save_figure(fig, path, dpi=120)
