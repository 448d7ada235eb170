"""``run_evaluation``: every registered evaluator on one model and one or more datasets, the Python entry behind
``mmsoftmoe eval`` (``eval.main``, the CLI) and ``eval.suite``, also used by the training loop (e.g. zero-shot on
``shapes`` every N steps)::

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

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torchvision.transforms import Normalize

import mmsoftmoe_eval.evaluators  # noqa: F401  (registers the evaluators)
from mmsoftmoe.models.clip import image_tower
from mmsoftmoe.parallel import ParallelMeshes
from mmsoftmoe_eval.datasets import dataset_name
from mmsoftmoe_eval.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS
from mmsoftmoe_eval.finetune import FinetuneConfig
from mmsoftmoe_eval.plots import dispatch_maps, last_soft_moe, num_tokens, plot_dispatch, spread_slots
from mmsoftmoe_eval.protocol import EVALUATORS, Session, TaskInputs, Transform, slug
from mmsoftmoe_eval.report import Provenance, plot_fewshot, write_report, write_task_files
from mmsoftmoe_eval.zero_shot import Tokenizer

logger = logging.getLogger("mmsoftmoe_eval.main")  # the name users filter on

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
    """``dispatch_<dataset>.png`` from the first test images, for Soft MoE towers with an output folder (computed on
    every process, as a sharded tower needs; written by the main one)."""
    tower = image_tower(session.model)
    layer = last_soft_moe(tower)
    if session.out_dir is None or layer is None:
        return None
    dataset = session.dataset(spec, session.scored_split(spec))
    images = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
    slots = spread_slots(layer.num_slots, num_slots)
    maps = dispatch_maps(tower, images.to(session.target_device), slots)  # on every process: a sharded tower
    if not session.is_main_process:
        return None
    return plot_dispatch(_denormalize(images, session.preprocess), maps, slots,
                         session.out_dir / f"dispatch_{slug(spec)}.png", tokens=num_tokens(tower),
                         title=f"{dataset_name(spec)}: last Soft MoE layer")


def evaluate_dataset(session: Session, spec: str, tasks: Sequence[str]) -> dict[str, Any]:
    """The metrics of every applicable task on ``spec``, plus ``seconds`` per task (and for the shared features) and
    ``num_samples`` per task (the samples its metrics were computed on)."""
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
    num_samples: dict[str, int] = {}
    for task in tasks:
        with _timed(seconds, task):
            results[task] = EVALUATORS[task].run(inputs)
        num_samples[task] = EVALUATORS[task].num_samples(inputs)
    if "labels" in capabilities:
        plot_dataset_dispatch(session, spec)
    return {**results, "seconds": seconds, "num_samples": num_samples}


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
    meshes: ParallelMeshes | None = None,
) -> dict[str, dict[str, Any]]:
    """Runs ``tasks`` on each dataset: ``{dataset: {task: metrics, "seconds": {...}, "num_samples": {...}}}``.

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
        meshes: The meshes ``model`` is sharded over (``mmsoftmoe.parallel``), when it is: every process then runs
            it on its share of the data (call on every process, inside ``unsharded_root(model)``), and fine-tuning
            shards its classifier over them too. Files are written by the main process.
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
        templates_file=Path(templates_file) if templates_file else None, meshes=meshes,
    )
    specs = [dataset] if isinstance(dataset, str) else list(dataset)
    results = {spec: evaluate_dataset(session, spec, tasks) for spec in specs}
    if out is not None and session.is_main_process:
        write_report(results, out)
        task_names = {name: evaluator.task for name, evaluator in EVALUATORS.items()}
        write_task_files(results, out / "clip_benchmark", task_names,
                         provenance or Provenance(checkpoint_hash=model_key))
        curves = {dataset_name(spec): result["fewshot"] for spec, result in results.items() if "fewshot" in result}
        if curves:
            plot_fewshot(curves, out / "fewshot.png", title="few-shot linear (ridge) on frozen pre-logits")
    return results
