"""The registered evaluators: zero-shot, retrieval, few-shot ridge, logistic probe, fine-tuning (``eval.protocol``).

Each class adapts one algorithm module (``eval.zero_shot``, ``eval.retrieval``, ``eval.fewshot``,
``eval.linear_probe``, ``eval.finetune``) to the protocol; the registration order is the canonical task order.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from mmsoftmoe.data import ShapesCaptions, load_pairs
from mmsoftmoe.models.clip import image_tower
from mmsoftmoe_eval.datasets import SHAPES_SPLITS
from mmsoftmoe_eval.fewshot import evaluate_fewshot
from mmsoftmoe_eval.finetune import finetune
from mmsoftmoe_eval.linear_probe import evaluate_linear_probe
from mmsoftmoe_eval.protocol import PAIRS_PREFIX, WDS_PREFIX, Evaluator, Session, TaskInputs, register, slug
from mmsoftmoe_eval.retrieval import evaluate_retrieval
from mmsoftmoe_eval.zero_shot import zero_shot_classifier, zero_shot_metrics


class _ImagesOnly(Dataset):
    """The images of a dataset of ``{"image": ...}`` dicts, for an image-only loader."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]["image"]


def retrieval_data(spec: str, session: Session) -> tuple[Dataset, list[list[str]]]:
    """Images and their captions: ``shapes`` (test-split seed), ``wds:ROOT`` (scored split) or ``pairs:PATH``.

    For ``pairs:PATH`` an unreadable image is replaced by the next row's (``PairDataset``'s rule), so it would pair
    with the wrong caption: clean such data first (``PairDataset.num_bad_images`` counts them). For ``wds:ROOT`` it
    becomes a black placeholder (logged), which keeps every caption paired with its own image.
    """
    if spec == "shapes":
        num_samples, seed = SHAPES_SPLITS["test"]
        shapes = ShapesCaptions(num_samples, seed=seed, transform=session.preprocess)
        return _ImagesOnly(shapes), [shapes.captions(i, session.captions_per_image) for i in range(len(shapes))]
    if spec.startswith(WDS_PREFIX):
        images = session.dataset(spec, session.scored_split(spec))
        return images, images.captions
    pairs = load_pairs(spec.removeprefix(PAIRS_PREFIX), transform=session.preprocess)
    return _ImagesOnly(pairs), [[str(caption)] for caption in pairs.data[pairs.caption_column]]


@register
class ZeroShot(Evaluator):
    """Zero-shot classification from class names x templates (``eval.zero_shot``)."""

    name, task = "zeroshot", "zeroshot_classification"
    needs = frozenset({"labels", "test_features"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        session = inputs.session
        classifier = zero_shot_classifier(session.model, session.tokenizer, inputs.dataset.classnames,
                                          inputs.dataset.templates, device=session.target_device)
        return zero_shot_metrics(inputs.test.embeddings, inputs.test.labels, classifier.cpu())

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        return [("zero-shot top-1", f"{metrics['acc1']:.3f}")]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"zero-shot top-1": metrics["acc1"]}


@register
class Retrieval(Evaluator):
    """Image-text retrieval recall@k (``eval.retrieval``)."""

    name, task = "retrieval", "zeroshot_retrieval"
    needs = frozenset({"captions"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        session, spec = inputs.session, inputs.spec
        images, captions = retrieval_data(spec, session)
        return evaluate_retrieval(
            session.model, session.tokenizer, session.loader(images), captions, batch_size=session.batch_size,
            device=session.device, accelerator=session.accelerator, image_cache=session.cache(spec, "retrieval"),
            text_cache=session.cache(spec, "retrieval", "text"),
        )

    def num_samples(self, inputs: TaskInputs) -> int:
        """The images retrieved among (each with its captions)."""
        return len(retrieval_data(inputs.spec, inputs.session)[1])

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        recalls = f"{metrics['text_retrieval_recall@1']:.3f} / {metrics['image_retrieval_recall@1']:.3f}"
        return [("image->text / text->image R@1", recalls)]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"image->text R@1": metrics["text_retrieval_recall@1"],
                "text->image R@1": metrics["image_retrieval_recall@1"]}


@register
class FewShot(Evaluator):
    """k-shot closed-form ridge on frozen pre-logits (``eval.fewshot``)."""

    name, task = "fewshot", "fewshot_ridge"
    needs = frozenset({"labels", "train_features", "test_features"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        session, train, test = inputs.session, inputs.train, inputs.test
        return evaluate_fewshot(train.pre_logits, train.labels, test.pre_logits, test.labels, shots=session.shots,
                                num_seeds=session.num_seeds, l2_reg=session.l2_reg,
                                classnames=inputs.dataset.classnames)

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        key = "10shot" if "10shot" in metrics else max(metrics, key=lambda k: int(k.removesuffix("shot")))
        entry = metrics[key]
        seeds = len(entry["acc1_per_seed"])
        return [(f"{key.removesuffix('shot')}-shot ridge top-1 (mean ± std, {seeds} seeds)",
                 f"{entry['acc1']:.3f} ± {entry['acc1_std']:.3f}")]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {f"{key.removesuffix('shot')}-shot top-1": entry["acc1"] for key, entry in metrics.items()}


@register
class LinearProbe(Evaluator):
    """Logistic-regression probe on normalised embeddings (``eval.linear_probe``)."""

    name, task = "linprobe", "linear_probe"
    needs = frozenset({"labels", "train_features", "test_features"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        train, test = inputs.train, inputs.test
        return evaluate_linear_probe(train.embeddings, train.labels, test.embeddings, test.labels,
                                     num_classes=len(inputs.dataset.classnames))

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        return [("logistic probe top-1", f"{metrics['acc1']:.3f}")]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"logistic probe top-1": metrics["acc1"]}


@register
class Finetune(Evaluator):
    """Full fine-tuning of the image tower with a new head (``eval.finetune``)."""

    name, task = "finetune", "finetune"
    needs = frozenset({"labels"})

    def run(self, inputs: TaskInputs) -> dict[str, Any]:
        session, spec = inputs.session, inputs.spec
        train_set = session.dataset(spec, session.train_split, train=True)
        test_set = session.dataset(spec, session.scored_split(spec))
        out = session.out_dir / "finetune" / slug(spec) if session.out_dir is not None else None
        return finetune(image_tower(session.model), train_set, test_set, config=session.finetune_config,
                        accelerator=session.accelerator, num_workers=session.num_workers, out_dir=out,
                        meshes=session.meshes)

    def rows(self, metrics: dict[str, Any]) -> list[tuple[str, str]]:
        return [("fine-tuned top-1", f"{metrics['acc1']:.3f}")]

    def columns(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"fine-tuned top-1": metrics["acc1"]}

