"""``mmsoftmoe eval``: every evaluator of ``eval/`` on one checkpoint and one or more datasets (the CLI of
``eval.runner.run_evaluation``, re-exported here).

The CLI loads a checkpoint (a training checkpoint folder or an exported open_clip folder, via ``load_whole_clip``),
builds the eval and train transforms from its ``preprocess_cfg`` and runs the chosen tasks on each dataset. ``OUT``
receives ``results.json`` (CLIP_benchmark's metric names, per dataset and task, plus seconds per task), ``results.md``,
``clip_benchmark/<dataset>_<task>.json`` (one file per dataset and task in CLIP_benchmark's results envelope, with the
checkpoint's hash), ``fewshot.png`` (accuracy vs shots), for Soft MoE towers ``dispatch_<dataset>.png`` (which patches
a few slots of the last Soft MoE layer draw from), the fine-tuned classifiers (and their per-step
``train_log.jsonl``) under ``finetune/<dataset>/`` and the feature cache. ``--suite FILE`` runs a list of datasets
instead (``eval.suite``: one table, one few-shot l2 per shot).

Launched under torchrun (``torchrun --nproc_per_node N --no-python mmsoftmoe eval ...``), every process evaluates its
share of each split and the features are gathered. A sharded training checkpoint (``checkpoints/step_*`` of a run
with ``parallel.dp_shard``) is then read sharded over the processes as its run held it, experts split over ``--ep``
(``mmsoftmoe.parallel.load_sharded_clip``: no process holds the whole model); in one process it is read whole, with no
``mmsoftmoe consolidate`` first.

``run_evaluation`` (``eval.runner``) is the Python entry, also for the training loop; it describes the features,
the cache and the tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState

from mmsoftmoe.arguments import check_arguments, check_minimum
from mmsoftmoe.checkpoint import (
    CONFIG_NAME,
    MANIFEST_NAME,
    SHARDED_DIR,
    TRAINER_STATE_NAME,
    has_manifest,
    model_weights,
    read_json,
)
from mmsoftmoe.data import transforms_from_preprocess_cfg
from mmsoftmoe.launch import launched_accelerator
from mmsoftmoe.models.clip import preprocess_config
from mmsoftmoe.parallel import (
    ParallelMeshes,
    is_sharded_checkpoint,
    load_sharded_clip,
    load_whole_clip,
    unsharded_root,
)
from mmsoftmoe_eval.datasets import SPEC_HELP
from mmsoftmoe_eval.features import sha256_file
from mmsoftmoe_eval.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS, L2_SWEEP
from mmsoftmoe_eval.finetune import FinetuneConfig
from mmsoftmoe_eval.report import Provenance, markdown_table
from mmsoftmoe_eval.runner import TASKS, parse_tasks, run_evaluation
from mmsoftmoe_eval.suite import load_suite, run_suite

logger = logging.getLogger("mmsoftmoe_eval.main")

__all__ = ["TASKS", "main", "parse_tasks", "run_evaluation"]  # run_evaluation stays importable from here


def checkpoint_fingerprint(path: str | Path) -> str:
    """Hash of the config and weights of the model a checkpoint folder exposes, keying its feature cache: the
    weights file's, or for a sharded training checkpoint its manifest's (which holds every shard's hash), else
    every shard's."""
    folder = Path(path)
    config = hashlib.sha256((folder / CONFIG_NAME).read_bytes()).hexdigest()[:16]
    if not is_sharded_checkpoint(folder):
        return f"{sha256_file(model_weights(folder))[:32]}-{config}"
    if has_manifest(folder):
        return f"{sha256_file(folder / MANIFEST_NAME)[:32]}-{config}"
    shards = hashlib.sha256()
    for path in sorted(p for p in (folder / SHARDED_DIR).rglob("*") if p.is_file()):
        shards.update(f"{path.name}:{sha256_file(path)}".encode())
    return f"{shards.hexdigest()[:32]}-{config}"


# flag -> (minimum, strict), checked with the run config's contract (one line naming the flag and its range).
ARGUMENT_MINIMUMS = {"--batch-size": (1, False), "--num-workers": (0, False), "--seeds": (1, False),
                     "--captions-per-image": (1, False), "--ep": (1, False)}


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmsoftmoe eval", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS,
                        help=f"training checkpoint or exported open_clip folder ({CONFIG_NAME} + weights)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", nargs="+", default=None, help=f"dataset spec(s): {SPEC_HELP}, pairs:PATH")
    data.add_argument("--suite", default=None,
                      help="YAML list of datasets and tasks (see eval.suite): one table, one few-shot l2 per shot")
    parser.add_argument("--classnames", default=None,
                        help="class names for every --dataset: .txt (one per line) or .json (list, or dataset name -> "
                             "list); default: classnames.txt next to the data, else built in (suite entries: "
                             "'classnames:')")
    parser.add_argument("--templates", default=None,
                        help="prompt templates ({c} or {} for the class name), same formats; default: "
                             "zeroshot_classification_templates.txt next to the data, else built in (suite entries: "
                             "'templates:')")
    parser.add_argument("--tasks", default="zeroshot,fewshot", help=f"comma-separated, from {','.join(TASKS)}")
    parser.add_argument("--out", default="eval_results", help="output folder")
    parser.add_argument("--shots", type=_int_list, default=DEFAULT_SHOTS, help="few-shot shots, e.g. 1,5,10,25")
    parser.add_argument("--seeds", type=int, default=3, help="few-shot seeds")
    parser.add_argument("--l2", choices=("fixed", "sweep"), default="fixed",
                        help="few-shot l2: big_vision's 2^10, or a sweep chosen on held-out train examples")
    parser.add_argument("--batch-size", type=int, default=256, help="images (captions) per inference batch")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--cache-dir", default=None, help="feature cache folder (None: OUT/features)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    parser.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no", help="accelerate mixed precision")
    parser.add_argument("--captions-per-image", type=int, default=5, help="captions per shapes image (retrieval)")
    parser.add_argument("--train-split", default="train", help="split the probes and fine-tuning learn from")
    parser.add_argument("--test-split", default=None,
                        help="split scored (None: test, or val for a folder with no test/)")
    parser.add_argument("--ep", type=int, default=None,
                        help="a sharded training checkpoint evaluated under torchrun: the processes its experts are "
                             "split over (default: the run's parallel.ep when it divides the process count, else 1)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="read a checkpoint that has no manifest.json (or fails it) without verifying it")
    finetuning = parser.add_argument_group("fine-tuning (--tasks finetune; see eval.finetune.FinetuneConfig)")
    for field in dataclasses.fields(FinetuneConfig):
        finetuning.add_argument(f"--ft-{field.name.replace('_', '-')}", type=type(field.default),
                                default=field.default, dest=f"ft_{field.name}", help=f"FinetuneConfig.{field.name}")
    return parser


def _model_name(config: dict) -> str:
    """The image tower's registered name (a checkpoint folder records no CLIP model name), for the results files."""
    return config.get("model_cfg", {}).get("vision_cfg", {}).get("timm_model_name") or "open_clip"


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(**{f.name: getattr(args, f"ft_{f.name}") for f in dataclasses.fields(FinetuneConfig)})


def run_ep(checkpoint: Path, num_processes: int) -> int:
    """The ``parallel.ep`` the checkpoint's run used (``trainer_state.json``) if it divides ``num_processes``,
    else 1."""
    state = Path(checkpoint) / TRAINER_STATE_NAME
    ep = read_json(state).get("config", {}).get("parallel", {}).get("ep", 1) if state.is_file() else 1
    if num_processes % ep:
        logger.info("the run split its experts over ep=%d processes, which does not divide the %d launched: "
                    "evaluating with ep=1 (pass --ep to choose)", ep, num_processes)
        return 1
    return ep


def load_model(args: argparse.Namespace, accelerator: Accelerator) -> tuple[Any, Any, dict, ParallelMeshes | None]:
    """(model, tokenizer, ``open_clip_config.json`` content, meshes) of ``--checkpoint``: a sharded training
    checkpoint under torchrun is read sharded over every process, as its run held it (``load_sharded_clip``:
    no whole copy anywhere); in one process it is read whole; any other folder whole on every process."""
    checkpoint = Path(args.checkpoint)
    if not is_sharded_checkpoint(checkpoint) or accelerator.num_processes == 1:
        return (*load_whole_clip(checkpoint, device=accelerator.device, verify=args.verify), None)
    ep = args.ep or run_ep(checkpoint, accelerator.num_processes)
    param_dtype = torch.bfloat16 if args.precision == "bf16" else None  # bf16 all-gathers, as a bf16 run's
    loaded = load_sharded_clip(checkpoint, device=accelerator.device, ep=ep, param_dtype=param_dtype,
                               verify=args.verify)
    logger.info("%s: sharded over %d processes (FSDP2), experts split over ep=%d; each evaluates its share",
                checkpoint, accelerator.num_processes, ep)
    return loaded


def run_cli(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Loads the checkpoint named by ``args`` and evaluates it; writes the report under ``args.out``."""
    tasks = parse_tasks(args.tasks)
    entries = load_suite(args.suite, tasks) if args.suite else None
    accelerator = launched_accelerator(mixed_precision=args.precision)  # every process, each on its share
    if args.ep is not None and not is_sharded_checkpoint(args.checkpoint):
        raise ValueError(f"--ep applies to a sharded training checkpoint (one with {SHARDED_DIR}/), and "
                         f"{args.checkpoint} holds a single-file model, which every process evaluates whole")
    model, tokenizer, config, meshes = load_model(args, accelerator)
    train_preprocess, preprocess = transforms_from_preprocess_cfg(preprocess_config(model))
    out = Path(args.out)
    fingerprint = checkpoint_fingerprint(args.checkpoint)
    common = dict(
        preprocess=preprocess, train_preprocess=train_preprocess, batch_size=args.batch_size,
        num_workers=args.num_workers, accelerator=accelerator, shots=args.shots, num_seeds=args.seeds,
        finetune_config=_finetune_config(args), captions_per_image=args.captions_per_image,
        train_split=args.train_split, test_split=args.test_split,
        cache_dir=None if args.no_cache else Path(args.cache_dir or out / "features"), model_key=fingerprint,
        provenance=Provenance(_model_name(config), str(Path(args.checkpoint).resolve()), fingerprint),
        meshes=meshes,
    )
    # A sharded model's towers run outside `forward`: its root parameters stay gathered meanwhile.
    with unsharded_root(model) if meshes is not None else contextlib.nullcontext():
        if entries is not None:
            return run_suite(model, tokenizer, entries, out, **common)
        return run_evaluation(model, tokenizer, dataset=args.dataset, tasks=tasks, out_dir=out,
                              l2_reg=DEFAULT_L2_REG if args.l2 == "fixed" else L2_SWEEP,
                              classnames_file=args.classnames, templates_file=args.templates, **common)


def main(argv: Sequence[str] | None = None) -> int:
    """``mmsoftmoe eval ...``: prints the results table."""
    args = build_parser().parse_args(argv)
    check_arguments(args, ARGUMENT_MINIMUMS)
    for shots in args.shots:
        check_minimum("--shots", shots, 1)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun the others log warnings only
    logging.basicConfig(level=logging.INFO if main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    results = run_cli(args)  # a user error becomes one `error:` line in the `mmsoftmoe` command
    if PartialState().is_main_process:  # under torchrun every process has the results; one prints them
        print(markdown_table(results))
        if args.suite:
            print((Path(args.out) / "suite.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
