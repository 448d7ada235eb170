"""Zero-shot classification: a classifier from class names x prompt templates, scored with cosine logits.

Follows CLIP (Radford et al. 2021, section 3.1.4) as implemented by open_clip's ``build_zero_shot_classifier`` (mean
of the L2-normalised text embeddings of every template, re-normalised) and reports CLIP_benchmark's metric names
(``acc1``, ``acc5``, ``mean_per_class_recall``, from ``eval.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import open_clip
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from mmsoftmoe.console import progress_enabled
from mmsoftmoe_eval.features import FeatureCacheKey, eval_mode, extract_features, resolve_device
from mmsoftmoe_eval.metrics import classification_metrics

Tokenizer = Callable[[list[str]], torch.Tensor]


def zero_shot_classifier(
    model: nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    *,
    device: torch.device | str = "cpu",
    classes_per_batch: int = 10,
    progress: bool = False,
) -> torch.Tensor:
    """Class embeddings of shape ``[e, C]``, unit norm per class (open_clip's builder, under inference mode).

    Args:
        model: CLIP-style model with ``encode_text(tokens, normalize=...)``, already on ``device``.
        tokenizer: Maps a list of strings to a ``[b, ctx]`` token tensor.
        classnames: One name per class, in label order.
        templates: Format strings with one ``{}`` (or callables) turning a class name into a prompt.
        device: Where the tokens go.
        classes_per_batch: Classes encoded per forward pass (times the number of templates prompts).
        progress: Show a progress bar.
    """
    if not classnames or not templates:
        raise ValueError("Zero-shot classification needs at least one class name and one prompt template.")
    with torch.no_grad(), eval_mode(model):  # not inference_mode: a sharded (FSDP2) model cannot run in it
        return open_clip.build_zero_shot_classifier(
            model, tokenizer, list(classnames), list(templates),
            num_classes_per_batch=classes_per_batch, device=device, use_tqdm=progress_enabled(progress),
        ).float()


def zero_shot_metrics(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict[str, float]:
    """Scores images against a zero-shot classifier with cosine logits.

    Args:
        image_features: ``[N, e]`` image embeddings (normalised here).
        labels: ``[N]`` true classes.
        classifier: ``[e, C]`` unit-norm class embeddings from ``zero_shot_classifier``.
    """
    if image_features.shape[1] != classifier.shape[0]:
        raise ValueError(
            f"Image features have width {image_features.shape[1]} but the classifier expects {classifier.shape[0]}: "
            "extract them with the same model's encode_image."
        )
    logits = torch.nn.functional.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)
    return classification_metrics(logits, labels)


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer: Tokenizer,
    loader: DataLoader,
    classnames: Sequence[str],
    templates: Sequence[str | Callable[[str], str]],
    *,
    device: torch.device | str | None = None,
    accelerator: Accelerator | None = None,
    autocast_dtype: torch.dtype | None = None,
    cache: FeatureCacheKey | None = None,
) -> dict[str, float]:
    """Zero-shot top-1 / top-5 / mean per-class recall of ``model`` on a labelled image loader.

    Args:
        model: CLIP-style model on the evaluation device.
        tokenizer: Maps a list of strings to a token tensor.
        loader: Yields ``(images, labels)``.
        classnames: One name per class, in label order.
        templates: Prompt templates, e.g. ``dataset.templates``.
        device: Device when no accelerator is given.
        accelerator: Supplies device, sharding and precision.
        autocast_dtype: Autocast dtype without an accelerator.
        cache: Feature cache entry for the image features (see ``eval.features``).
    """
    target = resolve_device(device, accelerator)
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device=target)
    with eval_mode(model):
        features, labels = extract_features(
            model.encode_image, loader, device=device, accelerator=accelerator,
            normalize=True, autocast_dtype=autocast_dtype, desc="zero-shot images", cache=cache,
        )
    if labels is None:
        raise ValueError("Zero-shot classification needs a loader yielding (images, labels) pairs.")
    return zero_shot_metrics(features, labels, classifier.cpu())
