"""``mmsoftmoe eval``: every evaluator of ``eval/`` on one checkpoint and one or more datasets; ``run_evaluation``.

The CLI loads a checkpoint (a training checkpoint folder or an exported open_clip folder, via ``load_clip``), builds the
eval and train transforms from its ``preprocess_cfg`` and runs the chosen tasks on each dataset. ``OUT`` receives
``results.json`` (CLIP_benchmark's metric names, per dataset and task, plus seconds per task), ``results.md``,
``fewshot.png`` (accuracy vs shots), for Soft MoE towers ``dispatch_<dataset>.png`` (which patches a few slots of the
last Soft MoE layer draw from), the fine-tuned classifiers under ``finetune/<dataset>/`` and the feature cache.

``run_evaluation`` is the Python entry, also for the training loop (e.g. zero-shot on ``shapes`` every N steps)::

    metrics = run_evaluation(model, tokenizer, dataset="shapes", tasks=("zeroshot",), preprocess=eval_tf,
                             accelerator=accelerator)["shapes"]["zeroshot"]

Per dataset, one pass over each split gives ``[pre-logits | embedding]`` per image, shared by the evaluators: zero-shot
and the logistic probe use the embeddings (as CLIP_benchmark), the few-shot ridge uses the image tower's pre-logits
(big_vision's ``img/pre_logits``). Features are cached on disk only when both ``cache_dir`` and ``model_key`` are
given (the CLI keys them by the checkpoint's hash); a training loop passes neither, as its model changes between calls.

Tasks: ``zeroshot``, ``fewshot``, ``linprobe`` and ``finetune`` take the classification specs of
``eval.datasets.build_dataset``; ``retrieval`` takes ``shapes`` (generated scenes, several captions each) or
``pairs:PATH`` (image-text files read by ``mmsoftmoe.data.load_pairs``, one caption per image), which supports
retrieval only. A task that does not apply to a dataset is skipped with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import Normalize

from eval.datasets import SHAPES_SPLITS, SPEC_HELP, build_dataset
from eval.features import FeatureCacheKey, eval_mode, extract_features, make_loader, resolve_device, sha256_file
from eval.fewshot import DEFAULT_L2_REG, DEFAULT_SHOTS, L2_SWEEP, evaluate_fewshot
from eval.finetune import FinetuneConfig, finetune
from eval.linear_probe import evaluate_linear_probe
from eval.plots import dispatch_maps, last_soft_moe, plot_dispatch, spread_slots
from eval.report import markdown_table, plot_fewshot, write_report
from eval.retrieval import evaluate_retrieval
from eval.zero_shot import Tokenizer, zero_shot_classifier, zero_shot_metrics
from mmsoftmoe.data import ShapesCaptions, load_pairs, transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import CONFIG_NAME, WEIGHTS_NAMES, image_tower, load_clip, preprocess_config

logger = logging.getLogger(__name__)

TASKS = ("zeroshot", "retrieval", "fewshot", "linprobe", "finetune")
PAIRS_PREFIX = "pairs:"
CAPTIONED_SPECS = ("shapes",)
PROBE_TASKS = {"fewshot", "linprobe"}  # use frozen features of the train split
FEATURE_TASKS = {"zeroshot", *PROBE_TASKS}  # use frozen features of the test split
Transform = Callable[[Any], torch.Tensor]


def parse_tasks(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """Task names from ``"zeroshot,fewshot"`` or a list, in the canonical order of ``TASKS``."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [name for name in names if name not in TASKS]
    if unknown or not names:
        raise ValueError(f"Unknown task(s) {unknown or names}; valid tasks: {', '.join(TASKS)}.")
    return tuple(task for task in TASKS if task in names)


def applicable_tasks(spec: str, tasks: Sequence[str]) -> tuple[str, ...]:
    """The tasks that apply to ``spec``; the others are skipped with a warning."""
    if spec.startswith(PAIRS_PREFIX):
        allowed = ("retrieval",)
    elif spec in CAPTIONED_SPECS:
        allowed = TASKS
    else:
        allowed = tuple(task for task in TASKS if task != "retrieval")
    skipped = [task for task in tasks if task not in allowed]
    if skipped:
        logger.warning("%s: skipping %s (not available for this dataset; retrieval needs captions: shapes or "
                       "pairs:PATH, and pairs:PATH has no class labels).", spec, skipped)
    return tuple(task for task in tasks if task in allowed)


def default_test_split(spec: str) -> str:
    """``val`` for an ImageNet-layout folder without a ``test`` folder, else ``test``."""
    root = Path(spec.removeprefix("folder:").split(":")[0]) if spec.startswith("folder:") else None
    if root is not None and not (root / "test").is_dir() and (root / "val").is_dir():
        return "val"
    return "test"


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """One split's frozen image features: the tower's pre-logits, the CLIP embeddings, the labels."""

    pre_logits: torch.Tensor
    embeddings: torch.Tensor
    labels: torch.Tensor


def image_encoder(model: nn.Module) -> tuple[Callable[[torch.Tensor], torch.Tensor], int | None]:
    """An encode function giving ``[pre-logits | embedding]`` in one pass, and the pre-logit width.

    The pre-logits are the pooled output of open_clip's timm trunk (before the projection head); for other towers the
    function is ``encode_image`` and the width None (the embedding serves as pre-logits).
    """
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    if trunk is None or getattr(trunk, "num_classes", None) != 0:
        return model.encode_image, None

    def encode(images: torch.Tensor) -> torch.Tensor:
        pre_logits = trunk(images)
        return torch.cat([pre_logits, visual.head(pre_logits)], dim=-1)

    return encode, trunk.num_features


class _ImagesOnly(Dataset):
    """The images of a dataset of ``{"image": ...}`` dicts, for an image-only loader."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.data[index]["image"]


def retrieval_data(spec: str, preprocess: Transform, captions_per_image: int) -> tuple[Dataset, list[list[str]]]:
    """Images and their captions for retrieval: ``shapes`` (test-split seed) or ``pairs:PATH``.

    For ``pairs:PATH`` an unreadable image is replaced by the next row's (``PairDataset``'s rule), so it would pair
    with the wrong caption: clean such data first (``PairDataset.num_bad_images`` counts them).
    """
    if spec == "shapes":
        num_samples, seed = SHAPES_SPLITS["test"]
        shapes = ShapesCaptions(num_samples, seed=seed, transform=preprocess)
        return _ImagesOnly(shapes), [shapes.captions(i, captions_per_image) for i in range(len(shapes))]
    pairs = load_pairs(spec.removeprefix(PAIRS_PREFIX), transform=preprocess)
    return _ImagesOnly(pairs), [[str(caption)] for caption in pairs.data[pairs.caption_column]]


def _denormalize(images: torch.Tensor, preprocess: Transform) -> torch.Tensor:
    """Undoes the ``Normalize`` step of ``preprocess`` (if any), for display."""
    norm = next((t for t in getattr(preprocess, "transforms", ()) if isinstance(t, Normalize)), None)
    if norm is None:
        return images
    return images * torch.tensor(norm.std).view(-1, 1, 1) + torch.tensor(norm.mean).view(-1, 1, 1)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    seconds[name] = round(time.perf_counter() - start, 3)


@dataclasses.dataclass
class _Evaluation:
    """One ``run_evaluation`` call: the model, its preprocessing and the evaluator settings, for every dataset."""

    model: nn.Module
    tokenizer: Tokenizer
    preprocess: Transform
    train_preprocess: Transform
    batch_size: int
    num_workers: int
    accelerator: Accelerator | None
    shots: Sequence[int]
    num_seeds: int
    l2_reg: float | Sequence[float]
    finetune_config: FinetuneConfig
    captions_per_image: int
    train_split: str
    test_split: str | None
    cache_dir: Path | None
    model_key: str | None
    out_dir: Path | None

    @property
    def device(self) -> torch.device | None:
        """The device for evaluators given no accelerator: the model's."""
        return None if self.accelerator is not None else next(self.model.parameters()).device

    def scored_split(self, spec: str) -> str:
        """The split the metrics are computed on."""
        return self.test_split or default_test_split(spec)

    def cache(self, spec: str, split: str, what: str = "image") -> FeatureCacheKey | None:
        """The cache entry of ``what`` (image or text features) of a split, or None when caching is off."""
        if self.cache_dir is None or self.model_key is None:
            return None
        precision = self.accelerator.mixed_precision if self.accelerator is not None else "no"
        dataset = f"{spec}:{self.preprocess!r}:{self.captions_per_image if what == 'text' else ''}"
        return FeatureCacheKey(self.cache_dir, f"{self.model_key}:{what}:{precision}", dataset, split)

    def loader(self, dataset: Dataset) -> torch.utils.data.DataLoader:
        device = resolve_device(self.device, self.accelerator)
        return make_loader(dataset, self.batch_size, self.num_workers, device=device)

    def split_features(self, spec: str, split: str) -> tuple[Any, SplitFeatures]:
        """The dataset of one split and its image features (one pass, cached when a cache is configured)."""
        dataset = build_dataset(spec, split, self.preprocess)
        encode, width = image_encoder(self.model)
        with eval_mode(self.model):
            features, labels = extract_features(encode, self.loader(dataset), device=self.device,
                                                accelerator=self.accelerator, desc=f"{spec} {split}",
                                                cache=self.cache(spec, f"{split}:pre_logits+embedding"))
        if width is None:
            return dataset, SplitFeatures(features, features, labels)
        return dataset, SplitFeatures(features[:, :width], features[:, width:], labels)

    def zeroshot(self, dataset: Any, test: SplitFeatures) -> dict[str, float]:
        device = resolve_device(self.device, self.accelerator)
        classifier = zero_shot_classifier(self.model, self.tokenizer, dataset.classnames, dataset.templates,
                                          device=device)
        return zero_shot_metrics(test.embeddings, test.labels, classifier.cpu())

    def retrieval(self, spec: str) -> dict[str, float]:
        images, captions = retrieval_data(spec, self.preprocess, self.captions_per_image)
        return evaluate_retrieval(
            self.model, self.tokenizer, self.loader(images), captions, batch_size=self.batch_size,
            device=self.device, accelerator=self.accelerator, image_cache=self.cache(spec, "retrieval"),
            text_cache=self.cache(spec, "retrieval", "text"),
        )

    def fewshot(self, dataset: Any, train: SplitFeatures, test: SplitFeatures) -> dict[str, Any]:
        return evaluate_fewshot(train.pre_logits, train.labels, test.pre_logits, test.labels, shots=self.shots,
                                num_seeds=self.num_seeds, l2_reg=self.l2_reg, classnames=dataset.classnames)

    def linprobe(self, dataset: Any, train: SplitFeatures, test: SplitFeatures) -> dict[str, float]:
        return evaluate_linear_probe(train.embeddings, train.labels, test.embeddings, test.labels,
                                     num_classes=len(dataset.classnames))

    def finetune(self, spec: str) -> dict[str, Any]:
        train_set = build_dataset(spec, self.train_split, self.train_preprocess)
        test_set = build_dataset(spec, self.scored_split(spec), self.preprocess)
        out = self.out_dir / "finetune" / _slug(spec) if self.out_dir is not None else None
        return finetune(image_tower(self.model), train_set, test_set, config=self.finetune_config,
                        accelerator=self.accelerator, num_workers=self.num_workers, out_dir=out)

    def plot_dispatch(self, spec: str, num_images: int = 4, num_slots: int = 6) -> Path | None:
        """``dispatch_<dataset>.png`` from the first test images, for Soft MoE towers with an output folder."""
        tower = image_tower(self.model)
        layer = last_soft_moe(tower)
        if self.out_dir is None or layer is None or spec.startswith(PAIRS_PREFIX):
            return None
        dataset = build_dataset(spec, self.scored_split(spec), self.preprocess)
        images = torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])
        slots = spread_slots(layer.num_slots, num_slots)
        maps = dispatch_maps(tower, images.to(next(tower.parameters()).device), slots)
        return plot_dispatch(_denormalize(images, self.preprocess), maps, slots,
                             self.out_dir / f"dispatch_{_slug(spec)}.png", title=f"{spec}: last Soft MoE layer")

    def evaluate(self, spec: str, tasks: Sequence[str]) -> dict[str, Any]:
        """The metrics of every applicable task on ``spec``, plus ``seconds`` per task (and for the features)."""
        tasks = applicable_tasks(spec, tasks)
        seconds: dict[str, float] = {}
        splits: dict[str, tuple[Any, SplitFeatures]] = {}
        if FEATURE_TASKS & set(tasks):
            with _timed(seconds, "features"):
                splits["test"] = self.split_features(spec, self.scored_split(spec))
                if PROBE_TASKS & set(tasks):
                    splits["train"] = self.split_features(spec, self.train_split)
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "zeroshot": lambda: self.zeroshot(*splits["test"]),
            "retrieval": lambda: self.retrieval(spec),
            "fewshot": lambda: self.fewshot(splits["test"][0], splits["train"][1], splits["test"][1]),
            "linprobe": lambda: self.linprobe(splits["test"][0], splits["train"][1], splits["test"][1]),
            "finetune": lambda: self.finetune(spec),
        }
        results: dict[str, Any] = {}
        for task in tasks:
            with _timed(seconds, task):
                results[task] = runners[task]()
        self.plot_dispatch(spec)
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
        out_dir: Where results.json / results.md, plots and fine-tuned classifiers go; None writes nothing.
    """
    tasks = parse_tasks(tasks)
    out = Path(out_dir) if out_dir is not None else None
    run = _Evaluation(
        model=model, tokenizer=tokenizer, preprocess=preprocess, train_preprocess=train_preprocess or preprocess,
        batch_size=batch_size, num_workers=num_workers, accelerator=accelerator, shots=tuple(shots),
        num_seeds=num_seeds, l2_reg=l2_reg, finetune_config=finetune_config or FinetuneConfig(),
        captions_per_image=captions_per_image, train_split=train_split, test_split=test_split,
        cache_dir=Path(cache_dir) if cache_dir is not None else None, model_key=model_key, out_dir=out,
    )
    results = {spec: run.evaluate(spec, tasks) for spec in ([dataset] if isinstance(dataset, str) else dataset)}
    if out is not None:
        write_report(results, out)
        curves = {spec: result["fewshot"] for spec, result in results.items() if "fewshot" in result}
        if curves:
            plot_fewshot(curves, out / "fewshot.png", title="few-shot linear (ridge) on frozen pre-logits")
    return results


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Tokenizer, dict]:
    """``load_clip`` with CLI-grade errors: a missing folder, a file instead of a folder, weights not matching."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"Checkpoint {folder} does not exist.")
    if folder.is_file():
        raise ValueError(f"--checkpoint takes the folder holding {CONFIG_NAME} and the weights, not the file "
                         f"{folder}: pass {folder.parent}.")
    return load_clip(folder, device=device)  # a ValueError names weights that do not match the config


def checkpoint_fingerprint(path: str | Path) -> str:
    """Hash of a checkpoint folder's config and weights, keying its feature cache."""
    folder = Path(path)
    weights = next(folder / name for name in WEIGHTS_NAMES if (folder / name).is_file())
    config = hashlib.sha256((folder / CONFIG_NAME).read_bytes()).hexdigest()[:16]
    return f"{sha256_file(weights)[:32]}-{config}"


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
    parser.add_argument("--dataset", required=True, nargs="+", default=argparse.SUPPRESS,
                        help=f"dataset spec(s): {SPEC_HELP}, pairs:PATH")
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
    finetuning = parser.add_argument_group("fine-tuning (--tasks finetune; see eval.finetune.FinetuneConfig)")
    for field in dataclasses.fields(FinetuneConfig):
        finetuning.add_argument(f"--ft-{field.name.replace('_', '-')}", type=type(field.default),
                                default=field.default, dest=f"ft_{field.name}", help=f"FinetuneConfig.{field.name}")
    return parser


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    return FinetuneConfig(**{f.name: getattr(args, f"ft_{f.name}") for f in dataclasses.fields(FinetuneConfig)})


def run_cli(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Loads the checkpoint named by ``args`` and evaluates it; writes the report under ``args.out``."""
    tasks = parse_tasks(args.tasks)
    accelerator = Accelerator(mixed_precision=args.precision)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, accelerator.device)
    train_preprocess, preprocess = transforms_from_preprocess_cfg(preprocess_config(model))
    out = Path(args.out)
    return run_evaluation(
        model, tokenizer, dataset=args.dataset, tasks=tasks, preprocess=preprocess, train_preprocess=train_preprocess,
        batch_size=args.batch_size, num_workers=args.num_workers, accelerator=accelerator, shots=args.shots,
        num_seeds=args.seeds, l2_reg=DEFAULT_L2_REG if args.l2 == "fixed" else L2_SWEEP,
        finetune_config=_finetune_config(args), captions_per_image=args.captions_per_image,
        train_split=args.train_split, test_split=args.test_split,
        cache_dir=None if args.no_cache else Path(args.cache_dir or out / "features"),
        model_key=checkpoint_fingerprint(args.checkpoint), out_dir=out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``mmsoftmoe eval ...``: prints the results table."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    results = run_cli(args)  # a user error becomes one `error:` line in the `mmsoftmoe` command
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
