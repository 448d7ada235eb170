"""The one evaluator protocol and its registry: big_vision's ``run(...) -> metrics``, evaluators looked up by name.

An evaluator (``Evaluator``) declares its ``name`` (the ``--tasks`` name), the ``task`` name of its results file
(CLIP_benchmark's ``zeroshot_classification``, ``zeroshot_retrieval``, ``linear_probe`` where one exists), what it
``needs``, and how its metrics read in summary tables (``rows`` for the demo, ``columns`` for a suite);
``run(TaskInputs) -> metrics`` does the work. ``register`` adds one to ``EVALUATORS``; ``eval.main`` iterates the
registry, so a new evaluator is one new registered class (and an import in ``eval.evaluators``), with no edit to the
runner, the suite or the demo's table.

Needs:

- ``labels`` / ``captions``: the dataset has class labels / image captions (``Session.capabilities``); an evaluator
  whose data kind a dataset lacks is skipped for it.
- ``test_features`` / ``train_features``: frozen image features of the scored / train split (``SplitFeatures``),
  computed once per dataset by ``Session.split_features`` and shared by every evaluator that needs them.

Evaluators needing neither feature set (retrieval, fine-tuning) read the data themselves through the ``Session``.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mmsoftmoe.parallel import ParallelMeshes
from mmsoftmoe_eval.datasets import build_dataset
from mmsoftmoe_eval.features import FeatureCacheKey, eval_mode, extract_features, make_loader, resolve_device
from mmsoftmoe_eval.finetune import FinetuneConfig
from mmsoftmoe_eval.wds import is_retrieval
from mmsoftmoe_eval.zero_shot import Tokenizer

PAIRS_PREFIX = "pairs:"
WDS_PREFIX = "wds:"
Transform = Callable[[Any], torch.Tensor]


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


def slug(spec: str) -> str:
    """A file-name-safe form of a dataset spec."""
    return re.sub(r"[^A-Za-z0-9]+", "_", spec).strip("_")


def default_test_split(spec: str) -> str:
    """``val`` for an ImageNet-layout folder without a ``test`` folder, else ``test``."""
    root = Path(spec.removeprefix("folder:").split(":")[0]) if spec.startswith("folder:") else None
    if root is not None and not (root / "test").is_dir() and (root / "val").is_dir():
        return "val"
    return "test"


@dataclasses.dataclass
class Session:
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
    classnames_file: Path | None = None
    templates_file: Path | None = None
    meshes: ParallelMeshes | None = None  # the model is sharded over these (``mmsoftmoe.parallel``)

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes the files (every process computes the results)."""
        return self.accelerator is None or self.accelerator.is_main_process

    @property
    def device(self) -> torch.device | None:
        """The device for evaluators given no accelerator: the model's."""
        return None if self.accelerator is not None else next(self.model.parameters()).device

    @property
    def target_device(self) -> torch.device:
        """Where inputs go: the accelerator's device or the model's."""
        return resolve_device(self.device, self.accelerator)

    def scored_split(self, spec: str) -> str:
        """The split the metrics are computed on."""
        return self.test_split or default_test_split(spec)

    def capabilities(self, spec: str) -> frozenset[str]:
        """What ``spec`` carries: ``labels`` (classification) and/or ``captions`` (retrieval)."""
        if spec.startswith(PAIRS_PREFIX):
            return frozenset({"captions"})
        if spec == "shapes":
            return frozenset({"labels", "captions"})
        if spec.startswith(WDS_PREFIX):
            return frozenset({"captions" if is_retrieval(spec.removeprefix(WDS_PREFIX)) else "labels"})
        return frozenset({"labels"})

    def dataset(self, spec: str, split: str, train: bool = False) -> Any:
        """One split of ``spec`` with the eval (or train) transform and the session's class-name/template files."""
        return build_dataset(spec, split, self.train_preprocess if train else self.preprocess,
                             classnames_file=self.classnames_file, templates_file=self.templates_file)

    def cache(self, spec: str, split: str, what: str = "image") -> FeatureCacheKey | None:
        """The cache entry of ``what`` (image or text features) of a split, or None when caching is off."""
        if self.cache_dir is None or self.model_key is None:
            return None
        precision = self.accelerator.mixed_precision if self.accelerator is not None else "no"
        dataset = f"{spec}:{self.preprocess!r}:{self.captions_per_image if what == 'text' else ''}"
        return FeatureCacheKey(self.cache_dir, f"{self.model_key}:{what}:{precision}", dataset, split)

    def loader(self, dataset: Dataset) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, device=self.target_device)

    def split_features(self, spec: str, split: str) -> tuple[Any, SplitFeatures]:
        """The dataset of one split and its image features (one pass, cached when a cache is configured)."""
        dataset = self.dataset(spec, split)
        encode, width = image_encoder(self.model)
        with eval_mode(self.model):
            features, labels = extract_features(encode, self.loader(dataset), device=self.device,
                                                accelerator=self.accelerator, desc=f"{spec} {split}",
                                                cache=self.cache(spec, f"{split}:pre_logits+embedding"))
        if width is None:
            return dataset, SplitFeatures(features, features, labels)
        return dataset, SplitFeatures(features[:, :width], features[:, width:], labels)


@dataclasses.dataclass(frozen=True)
class TaskInputs:
    """What an evaluator's ``run`` gets: the dataset spec, the session, and the features it declared it needs.

    Attributes:
        spec: The dataset spec.
        session: Model, settings and data helpers.
        dataset: The scored split's dataset (class names, templates) when test features were needed, else None.
        test: Features of the scored split, when needed.
        train: Features of the train split, when needed.
    """

    spec: str
    session: Session
    dataset: Any = None
    test: SplitFeatures | None = None
    train: SplitFeatures | None = None


class Evaluator(abc.ABC):
    """One evaluation protocol (see the module docstring)."""

    name: ClassVar[str]
    task: ClassVar[str]
    needs: ClassVar[frozenset[str]]

    @abc.abstractmethod
    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        """The metrics on one dataset."""

    def num_samples(self, inputs: TaskInputs) -> int:
        """How many samples ``run``'s metrics were computed on: the scored split's readable images (the test
        features' rows when there are features, else the scored split's size)."""
        if inputs.test is not None:
            return len(inputs.test.labels)
        return len(inputs.session.dataset(inputs.spec, inputs.session.scored_split(inputs.spec)))

    @abc.abstractmethod
    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        """``(measure, formatted value)`` rows for a summary table such as the demo's."""

    @abc.abstractmethod
    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        """Headline numbers (fractions) by column name, for the suite's per-dataset table (``eval.suite``)."""

    def applies_to(self, capabilities: frozenset[str]) -> bool:
        """Whether a dataset with these capabilities has the data kind this evaluator needs."""
        return self.needs & {"labels", "captions"} <= capabilities


EVALUATORS: dict[str, Evaluator] = {}


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator adding an evaluator to ``EVALUATORS`` under its ``name`` (registration order = run order)."""
    if cls.name in EVALUATORS:
        raise ValueError(f"An evaluator named {cls.name!r} is already registered.")
    EVALUATORS[cls.name] = cls()
    return cls
