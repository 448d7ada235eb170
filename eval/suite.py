"""``mmsoftmoe eval --suite FILE``: a list of datasets and tasks, one aggregate table, one few-shot l2 per shot count.

The suite file is YAML, a list of entries (only ``dataset`` is required)::

    - dataset: wds:/data/wds_cifar10          # any --dataset spec
      name: cifar10                           # row name (default: the spec's last folder)
      tasks: [zeroshot, fewshot, linprobe]    # default: --tasks
      classnames: /data/cifar10_names.txt     # optional, eval.prompts formats
      templates: /data/cifar10_templates.txt  # optional

Few-shot l2 (vmoe ``evaluate/fewshot.py``: one l2 per shot count, the candidate of ``L2_SWEEP`` with the best mean
rank across the datasets; vmoe ranks by test accuracy, here by accuracy on train examples held out of the k-shot
sets, so the test split is never used for a choice). Pass 1 runs the few-shot probe with the whole sweep on every
few-shot dataset and ranks the candidates per dataset by held-out accuracy (mean over seeds; rank 1 is best, ties
share the mean rank); the best mean rank wins (ties: the stronger penalty). Pass 2 evaluates every entry with the
chosen values on the same k-shot sets. With the feature cache on (the CLI default) pass 2 reads pass 1's features.

``OUT/<name>/`` holds each dataset's report (as ``mmsoftmoe eval``); ``OUT/suite.md`` and ``OUT/suite.csv`` the table
(one row per dataset, one column per headline metric, and their mean over the datasets that have it);
``OUT/suite.json`` the table, the chosen l2 values and every candidate's mean rank.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mmsoftmoe_eval.datasets import dataset_name
from mmsoftmoe_eval.fewshot import DEFAULT_L2_REG, L2_SWEEP
from mmsoftmoe_eval.protocol import EVALUATORS, slug
from mmsoftmoe_eval.report import write_json
from mmsoftmoe_eval.runner import parse_tasks, run_evaluation

ENTRY_KEYS = {"dataset", "name", "tasks", "classnames", "templates"}


@dataclasses.dataclass(frozen=True)
class SuiteEntry:
    """One dataset of a suite and what to run on it."""

    dataset: str
    name: str
    tasks: tuple[str, ...]
    classnames: str | None = None
    templates: str | None = None


def load_suite(path: str | Path, default_tasks: str | Sequence[str]) -> list[SuiteEntry]:
    """The entries of a suite file (format in the module docstring); errors name the entry and the fix."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"No suite file {path}: pass a YAML list of entries like '- dataset: digits'.")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({' '.join(str(error).split())}): fix the suite file.") from error
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{path}: a suite is a non-empty YAML list of entries like '- dataset: wds:/data/cifar10'.")
    entries = []
    for index, item in enumerate(raw):
        if not isinstance(item, Mapping) or "dataset" not in item or set(item) - ENTRY_KEYS:
            raise ValueError(f"{path}: entry {index} must be a mapping with 'dataset' and optionally "
                             f"{sorted(ENTRY_KEYS - {'dataset'})}, got {item!r}.")
        entries.append(SuiteEntry(
            dataset=str(item["dataset"]), name=str(item.get("name") or dataset_name(str(item["dataset"]))),
            tasks=parse_tasks(item.get("tasks", default_tasks)), classnames=item.get("classnames"),
            templates=item.get("templates"),
        ))
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: entry names {names} repeat; give each entry a distinct 'name'.")
    return entries


def mean_ranks(scores: Sequence[Sequence[float]]) -> list[float]:
    """Per candidate, its rank (1 = highest score, ties share the mean rank) averaged over the score lists."""
    totals = [0.0] * len(scores[0])
    for row in scores:
        for j, value in enumerate(row):
            above, equal = sum(v > value for v in row), sum(v == value for v in row)
            totals[j] += 1 + above + (equal - 1) / 2
    return [total / len(scores) for total in totals]


def choose_l2(fewshot_results: Sequence[Mapping[str, Any]], candidates: Sequence[float]) -> dict[str, Any]:
    """Per shot count, the candidate with the best mean rank of held-out accuracy across datasets.

    Args:
        fewshot_results: Each dataset's ``evaluate_fewshot`` output run with the sweep ``candidates``.
        candidates: The swept l2 values, in the order of ``holdout_acc1_per_l2``.

    Returns:
        ``{"10shot": {"l2_reg": chosen, "mean_rank": [per candidate]}, ...}``.
    """
    chosen = {}
    for key in fewshot_results[0]:
        ranks = mean_ranks([result[key]["holdout_acc1_per_l2"] for result in fewshot_results])
        best = min(range(len(candidates)), key=lambda j: (ranks[j], -candidates[j]))
        chosen[key] = {"l2_reg": candidates[best], "mean_rank": ranks}
    return chosen


def summary_table(results: Mapping[str, Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: one row per dataset with each evaluator's ``columns``, then the mean of each column."""
    per_dataset = {name: {column: value for task, evaluator in EVALUATORS.items() if task in result
                          for column, value in evaluator.columns(result[task]).items()}
                   for name, result in results.items()}
    header = list(dict.fromkeys(column for values in per_dataset.values() for column in values))
    rows = [[name, *(values.get(column) for column in header)] for name, values in per_dataset.items()]
    means = []
    for column in header:
        present = [values[column] for values in per_dataset.values() if column in values]
        means.append(sum(present) / len(present))
    return ["dataset", *header], [*rows, ["mean", *means]]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" if isinstance(value, float) else str(value)


def write_summary(header: list[str], rows: list[list[Any]], out_dir: Path) -> None:
    """``suite.md`` (values as percentages) and ``suite.csv`` (raw fractions)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    (out_dir / "suite.md").write_text("\n".join(lines) + "\n\nValues in %; mean over the datasets with a value.\n")
    with (out_dir / "suite.csv").open("w", newline="") as file:
        csv.writer(file).writerows([header, *[["" if v is None else v for v in row] for row in rows]])


def run_suite(model: Any, tokenizer: Any, entries: Sequence[SuiteEntry], out_dir: str | Path,
              **common: Any) -> dict[str, dict[str, Any]]:
    """Evaluates every entry (two passes when few-shot is asked, see the module docstring) and writes the table.

    Args:
        model: open_clip model on its device.
        tokenizer: Its tokenizer.
        entries: From ``load_suite``.
        out_dir: Output folder.
        **common: Further ``run_evaluation`` arguments shared by all entries (not ``dataset``, ``tasks``,
            ``l2_reg``, ``out_dir``, ``classnames_file``, ``templates_file``).

    Returns:
        ``{name: run_evaluation result of that dataset}``.
    """
    out = Path(out_dir)

    def evaluate(entry: SuiteEntry, tasks: Sequence[str], l2_reg: Any, folder: Path | None) -> dict[str, Any]:
        return run_evaluation(model, tokenizer, dataset=entry.dataset, tasks=tasks, l2_reg=l2_reg, out_dir=folder,
                              classnames_file=entry.classnames, templates_file=entry.templates,
                              **common)[entry.dataset]

    probed = [entry for entry in entries if "fewshot" in entry.tasks]
    chosen = choose_l2([evaluate(entry, ("fewshot",), L2_SWEEP, None)["fewshot"] for entry in probed],
                       L2_SWEEP) if probed else {}
    per_shot = {int(key.removesuffix("shot")): value["l2_reg"] for key, value in chosen.items()}
    results = {entry.name: evaluate(entry, entry.tasks, per_shot or DEFAULT_L2_REG, out / slug(entry.name))
               for entry in entries}
    header, rows = summary_table(results)
    accelerator = common.get("accelerator")
    if accelerator is not None and not accelerator.is_main_process:  # every process has the results; one writes
        return results
    out.mkdir(parents=True, exist_ok=True)
    write_summary(header, rows, out)
    write_json({"columns": header, "rows": rows, "fewshot_l2": chosen, "l2_candidates": list(L2_SWEEP),
                "datasets": {entry.name: entry.dataset for entry in entries}}, out / "suite.json")
    return results
