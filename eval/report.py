"""Evaluation results on disk: JSON (CLIP_benchmark's metric names), a markdown table, and a few-shot plot.

Results are nested dicts such as ``{"digits": {"zeroshot": {"acc1": 0.9}, "fewshot": {"10shot": {...}}}}``; the
markdown table lists every scalar leaf with its path, the JSON keeps everything (per-seed lists included).

``write_task_files`` also writes one file per dataset and task in CLIP_benchmark's envelope (``clip_benchmark/cli.py``:
``dataset``, ``model``, ``pretrained``, ``task``, ``metrics``, ``language``), plus the checkpoint's hash, the task's
seconds and ``num_samples`` (the samples its metrics were computed on) outside ``metrics``, so CLIP_benchmark's
``build`` command and its readers take them as they are.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from mmsoftmoe.figures import save_figure


@dataclasses.dataclass(frozen=True)
class Provenance:
    """What was evaluated, for the per-task files: model name, checkpoint path (``pretrained``), checkpoint hash."""

    model: str = ""
    pretrained: str = ""
    checkpoint_hash: str | None = None
    language: str = "en"


def task_record(spec: str, task: str, metrics: Mapping[str, Any], seconds: float | None,
                provenance: Provenance, num_samples: int | None = None) -> dict[str, Any]:
    """One dataset and task in CLIP_benchmark's results envelope, with the checkpoint hash, timing and sample count
    beside it."""
    return {"dataset": spec, "model": provenance.model, "pretrained": provenance.pretrained, "task": task,
            "metrics": dict(metrics), "language": provenance.language, "checkpoint_hash": provenance.checkpoint_hash,
            "seconds": seconds, "num_samples": num_samples}


def write_task_files(results: Mapping[str, Mapping[str, Any]], folder: str | Path, task_names: Mapping[str, str],
                     provenance: Provenance) -> list[Path]:
    """``<folder>/<dataset>_<task>.json`` per dataset and task of ``run_evaluation``'s results.

    Args:
        results: ``{spec: {task: metrics, "seconds": {task: s}, "num_samples": {task: n}}}``.
        folder: Output folder.
        task_names: Our task name -> the file's task name (CLIP_benchmark's where one exists).
        provenance: Model, checkpoint path and hash.
    """
    paths = []
    for spec, result in results.items():
        for task, metrics in result.items():
            if task in task_names:
                record = task_record(spec, task_names[task], metrics, result.get("seconds", {}).get(task), provenance,
                                     result.get("num_samples", {}).get(task))
                name = re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")
                paths.append(write_json(record, Path(folder) / f"{name}_{task_names[task]}.json"))
    return paths


def _scalars(results: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(path, value)`` for every number or string leaf; lists are left to the JSON."""
    for key, value in results.items():
        if isinstance(value, Mapping):
            yield from _scalars(value, (*prefix, str(key)))
        elif isinstance(value, (int, float, str)):
            yield (*prefix, str(key)), value


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(results: Mapping[str, Any]) -> str:
    """A ``| result | metric | value |`` table of the scalar leaves of ``results``."""
    lines = ["| result | metric | value |", "| --- | --- | --- |"]
    for path, value in _scalars(results):
        lines.append(f"| {' / '.join(path[:-1])} | {path[-1]} | {_format(value)} |")
    return "\n".join(lines) + "\n"


def write_json(results: Mapping[str, Any], path: str | Path) -> Path:
    """Writes ``results`` as indented JSON (NaN becomes null) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nan_to_none(results), indent=2, sort_keys=False) + "\n")
    return path


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def plot_fewshot(curves: Mapping[str, Mapping[str, Mapping[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Few-shot accuracy vs shots (log x axis, std over seeds as error bars), one line per curve, saved as PNG.

    Args:
        curves: Label -> ``evaluate_fewshot`` output (``{"10shot": {"acc1": ..., "acc1_std": ...}}``).
        path: PNG file to write.
        title: Plot title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    all_shots = set()
    for label, result in curves.items():
        points = sorted((int(key.removesuffix("shot")), v["acc1"], v.get("acc1_std", 0.0)) for key, v in result.items())
        shots, means, stds = zip(*points, strict=True)
        all_shots.update(shots)
        ax.errorbar(shots, [100 * m for m in means], yerr=[100 * s for s in stds], marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_shots), [str(s) for s in sorted(all_shots)])
    ax.set(xlabel="examples per class (shots)", ylabel="top-1 accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def write_report(results: Mapping[str, Any], out_dir: str | Path, name: str = "results") -> dict[str, Path]:
    """Writes ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    markdown = out_dir / f"{name}.md"
    json_path = write_json(results, out_dir / f"{name}.json")
    markdown.write_text(markdown_table(results))
    return {"json": json_path, "markdown": markdown}
