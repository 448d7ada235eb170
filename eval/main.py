"""``mmsoftmoe eval``: every evaluator of ``eval/`` on one checkpoint and one or more datasets; ``run_evaluation``.

The CLI loads a checkpoint (a training checkpoint folder or an exported open_clip folder, via ``load_clip``), builds the
eval and train transforms from its ``preprocess_cfg`` and runs the chosen tasks on each dataset. ``OUT`` receives
``results.json`` (CLIP_benchmark's metric names, per dataset and task, plus seconds per task), ``results.md``,
``clip_benchmark/<dataset>_<task>.json`` (one file per dataset and task in CLIP_benchmark's results envelope, with the
checkpoint's hash), ``fewshot.png`` (accuracy vs shots), for Soft MoE towers ``dispatch_<dataset>.png`` (which patches
a few slots of the last Soft MoE layer draw from), the fine-tuned classifiers under ``finetune/<dataset>/`` and the
feature cache. ``--suite FILE`` runs a list of datasets instead (``eval.suite``: one table, one few-shot l2 per shot).

``run_evaluation`` is the Python entry, also for the training loop (e.g. zero-shot on ``shapes`` every N steps)::

    metrics = run_evaluation(model, tokenizer, dataset="shapes", tasks=("zeroshot",), preprocess=eval_tf,
                             accelerator=accelerator)["shapes"]["zeroshot"]

Per dataset, one pass over each split gives ``[pre-logits | embedding]`` per image, shared by the evaluators: zero-shot
and the logistic probe use the embeddings (as CLIP_benchmark), the few-shot ridge uses the image tower's pre-logits
(big_vision's ``img/pre_logits``). Features are cached on disk only when both ``cache_dir`` and ``model_key`` are
given (the CLI keys them by the checkpoint's hash); a training loop passes neither, as its model changes between calls.

Tasks are the evaluators registered in ``eval.protocol.EVALUATORS`` (``eval.evaluators``): ``zeroshot``, ``fewshot``,
``linprobe`` and ``finetune`` need class labels (the specs of ``eval.datasets.build_dataset``), ``retrieval`` needs
captions: ``shapes`` (generated scenes, several captions each), a ``wds:ROOT`` retrieval set (``eval.wds``) or
``pairs:PATH`` (image-text files read by ``mmsoftmoe.data.load_pairs``, one caption per image). A task whose data a
dataset lacks is skipped with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torchvision.transforms import Normalize

import mmsoftmoe_eval.evaluators  # noqa: F401  (registers the evaluators)
from mmsoftmoe_eval.datasets import SPEC_HELP, dataset_name
from mmsoftmoe_eval.features import sha256_file
from mmsoftmoe_eval.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS, L2_SWEEP
from mmsoftmoe_eval.finetune import FinetuneConfig
from mmsoftmoe_eval.plots import dispatch_maps, last_soft_moe, num_tokens, plot_dispatch, spread_slots
from mmsoftmoe_eval.protocol import EVALUATORS, Session, TaskInputs, Transform, slug
from mmsoftmoe_eval.report import Provenance, markdown_table, plot_fewshot, write_report, write_task_files
from mmsoftmoe_eval.zero_shot import Tokenizer
from mmsoftmoe.arguments import check_arguments, check_minimum
from mmsoftmoe.checkpoint import CONFIG_NAME, model_weights
from mmsoftmoe.data import transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import image_tower, load_clip, preprocess_config

logger = logging.getLogger(__name__)

TASKS = tuple(EVALUATORS)
FEATURE_NEEDS = frozenset({"test_features", "train_features"})


def parse_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """Task names from ``"zeroshot,fewshot"`` or a list, in registration order (``TASKS`` for the built-in ones)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [name for name in names if name not in EVALUATORS]
    if unknown or not names:
        raise ValueError(f"Unknown task(s) {unknown or names}; valid tasks: {', '.join(EVALUATORS)}.")
    return tuple(task for task in EVALUATORS if task in names)


def applicable_tasks(spec: str, tasks: Sequence[str], capabilities: frozenset[str]) -> tuple[str, ...]:
    """The tasks whose data kind ``spec`` has (``Evaluator.applies_to``); the others are skipped with a warning."""
    allowed = tuple(task for task in tasks if EVALUATORS[task].applies_to(capabilities))
    skipped = [task for task in tasks if task not in allowed]
    if skipped:
        logger.warning("%s: skipping %s (this dataset has %s only; retrieval needs captions: shapes, pairs:PATH or "
                       "a wds retrieval set; the other tasks need class labels).", spec, skipped, sorted(capabilities))
    return allowed


def _denormalize(images: torch.Tensor, preprocess: Transform) -> torch.Tensor:
    """Undoes the ``Normalize`` step of ``preprocess`` (if any), for display."""
    norm = next((t for t in getattr(preprocess, "transforms", ()) if isinstance(t, Normalize)), None)
    if norm is None:
        return images
    return images * torch.tensor(norm.std).view(-1, 1, 1) + torch.tensor(norm.mean).view(-1, 1, 1)


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)


def plot_dataset_dispatch(session: Session, spec: str, num_images: int = 4, num_slots: int = 6) -> Path | None:
    """``dispatch_<dataset>.png`` from the first test images, for Soft MoE towers with an output folder."""
    tower = image_tower(session.model)
    layer = last_soft_moe(tower)
    if session.out_dir is None or layer is None:
        return None
    dataset = session.dataset(spec, session.scored_split(spec))
    images = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    slots = spread_slots(layer.num_slots, num_slots)
    maps = dispatch_maps(tower, images.to(next(tower.parameters()).device), slots)
    return plot_dispatch(_denormalize(images, session.preprocess), maps, slots,
                         session.out_dir / f"dispatch_{slug(spec)}.png", tokens=num_tokens(tower),
                         title=f"{dataset_name(spec)}: last Soft MoE layer")


def evaluate_dataset(session: Session, spec: str, tasks: Sequence[str]) -> dict[str, Any]:
    """The metrics of every applicable task on ``spec``, plus ``seconds`` per task (and for the shared features)."""
    capabilities = session.capabilities(spec)
    tasks = applicable_tasks(spec, tasks, capabilities)
    needs = frozenset().union(*(EVALUATORS[task].needs for task in tasks))
    seconds: dict[str, float] = {}
    inputs = TaskInputs(spec, session)
    if needs & FEATURE_NEEDS:
        with _timed(seconds, "features"):
            dataset, test = session.split_features(spec, session.scored_split(spec))
            train = session.split_features(spec, session.train_split)[1] if "train_features" in needs else None
        inputs = TaskInputs(spec, session, dataset, test, train)
    results: dict[str, Any] = {}
    for task in tasks:
        with _timed(seconds, task):
            results[task] = EVALUATORS[task].run(inputs)
    if "labels" in capabilities:
        plot_dataset_dispatch(session, spec)
    return {**results, "seconds": seconds}


def run_evaluation(
    model: nn.Module,
    tokenizer: Tokenizer,
    *,
    dataset: str | Sequence[str],
    tasks: str | Sequence[str] = ("zeroshot",),
    preprocess: Transform,
    train_preprocess: Transform | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    num_seeds: int = 3,
    l2_reg: float | Sequence[float] = DEFAULT_L2_REG,
    finetune_config: FinetuneConfig | None = None,
    captions_per_image: int = 5,
    train_split: str = "train",
    test_split: str | None = None,
    cache_dir: str | Path | None = None,
    model_key: str | None = None,
    out_dir: str | Path | None = None,
    classnames_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    provenance: Provenance | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs ``tasks`` on each dataset and returns ``{dataset: {task: metrics, "seconds": {...}}}``.

    Args:
        model: open_clip model (``encode_image``, ``encode_text``, ``visual``) on its device; left in its mode.
        tokenizer: Maps a list of strings to a token tensor.
        dataset: One spec or several (``build_dataset`` specs, ``pairs:PATH``).
        tasks: Names from ``TASKS`` (a list or ``"zeroshot,fewshot"``).
        preprocess: Eval transform (PIL image -> tensor), e.g. from ``transforms_from_preprocess_cfg``.
        train_preprocess: Train transform for fine-tuning; ``preprocess`` when None.
        batch_size: Images (and captions) per inference batch.
        num_workers: DataLoader workers.
        accelerator: Device, sharding and precision; without one, everything runs on the model's device.
        shots: Few-shot examples per class.
        num_seeds: Few-shot seeds.
        l2_reg: Few-shot l2: a value (fixed) or a sequence (swept on held-out train examples).
        finetune_config: Fine-tuning hyper-parameters (defaults when None); ``finetune`` reseeds the global RNGs.
        captions_per_image: Captions per ``shapes`` image for retrieval.
        train_split: Split the probes and fine-tuning train on.
        test_split: Split evaluated; ``default_test_split`` when None.
        cache_dir: Feature cache folder; used only together with ``model_key``.
        model_key: Fingerprint of the model's weights (e.g. a checkpoint hash) keying the cache; leave None for a
            model that changes between calls, such as one being trained.
        out_dir: Where results.json / results.md, the per-task CLIP_benchmark files, plots and fine-tuned classifiers
            go; None writes nothing.
        classnames_file: Class names for every classification dataset (``eval.prompts`` formats).
        templates_file: Prompt templates for every classification dataset.
        provenance: Model name, checkpoint path and hash for the per-task results files.
    """
    tasks = parse_tasks(tasks)
    out = Path(out_dir) if out_dir is not None else None
    session = Session(
        model=model, tokenizer=tokenizer, preprocess=preprocess, train_preprocess=train_preprocess or preprocess,
        batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, shots=tuple(shots),
        num_seeds=num_seeds, l2_reg=l2_reg, finetune_config=finetune_config or FinetuneConfig(),
        captions_per_image=captions_per_image, train_split=train_split, test_split=test_split,
        cache_dir=Path(cache_dir) if cache_dir is not None else None, model_key=model_key, out_dir=out,
        classnames_file=Path(classnames_file) if classnames_file else None,
        templates_file=Path(templates_file) if templates_file else None,
    )
    specs = [dataset] if isinstance(dataset, str) else list(dataset)
    results = {spec: evaluate_dataset(session, spec, tasks) for spec in specs}
    if out is not None:
        write_report(results, out)
        task_names = {name: evaluator.task for name, evaluator in EVALUATORS.items()}
        write_task_files(results, out / "clip_benchmark", task_names,
                         provenance or Provenance(checkpoint_hash=model_key))
        curves = {dataset_name(spec): result["fewshot"] for spec, result in results.items() if "fewshot" in result}
        if curves:
            plot_fewshot(curves, out / "fewshot.png", title="few-shot linear (ridge) on frozen pre-logits")
    return results


def checkpoint_fingerprint(path: str | Path) -> str:
    """Hash of the config and weights of the model a checkpoint folder exposes, keying its feature cache."""
    folder = Path(path)
    config = hashlib.sha256((folder / CONFIG_NAME).read_bytes()).hexdigest()[:16]
    return f"{sha256_file(model_weights(folder))[:32]}-{config}"


# flag -> (minimum, strict), checked with the run config's contract (one line naming the flag and its range).
ARGUMENT_MINIMUMS = {"--batch-size": (1, False), "--num-workers": (0, False), "--seeds": (1, False),
                     "--captions-per-image": (1, False)}


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


def run_cli(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Loads the checkpoint named by ``args`` and evaluates it; writes the report under ``args.out``."""
    from mmsoftmoe_eval.suite import load_suite, run_suite

    tasks = parse_tasks(args.tasks)
    entries = load_suite(args.suite, tasks) if args.suite else None
    accelerator = Accelerator(mixed_precision=args.precision)
    model, tokenizer, config = load_clip(args.checkpoint, device=accelerator.device, verify=args.verify)
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
    )
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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_cli(args)  # a user error becomes one `error:` line in the `mmsoftmoe` command
    print(markdown_table(results))
    if args.suite:
        print((Path(args.out) / "suite.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
