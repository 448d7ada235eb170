"""Classification metrics shared by every evaluator that predicts classes (zero-shot, probes, fine-tuning).

CLIP_benchmark's metric names and definitions (``clip_benchmark/metrics/zeroshot_classification.py``): ``acc1``,
``acc5`` and ``mean_per_class_recall`` (scikit-learn's ``balanced_accuracy_score``), computed with torchmetrics.
"""

from __future__ import annotations

import warnings

import torch
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_recall


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall with CLIP_benchmark's names.

    ``mean_per_class_recall`` averages the recall of the classes present in ``labels`` (as scikit-learn's
    ``balanced_accuracy_score``, which CLIP_benchmark uses): a class absent from the test set does not count as 0.
    With fewer than 5 classes, ``acc5`` is top-``num_classes`` accuracy (always 1.0) and a warning says so.

    Args:
        logits: Scores of shape ``[N, C]``.
        labels: True classes of shape ``[N]``.
    """
    num_classes = logits.shape[1]
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"Labels go up to {int(labels.max())} but there are only {num_classes} classes: "
            "pass one class name (or one logit column) per label."
        )
    top_k = min(5, num_classes)
    if top_k < 5:
        warnings.warn(f"Only {num_classes} classes: acc5 is top-{top_k} accuracy.", stacklevel=2)
    labels = labels.to(logits.device)
    recall_per_class = multiclass_recall(logits, labels, num_classes=num_classes, average="none")
    present = torch.bincount(labels, minlength=num_classes) > 0
    return {
        "acc1": multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro", top_k=1).item(),
        "acc5": multiclass_accuracy(logits, labels, num_classes=num_classes, average="micro", top_k=top_k).item(),
        "mean_per_class_recall": recall_per_class[present].mean().item(),
    }
