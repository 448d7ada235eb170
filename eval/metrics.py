"""Classification metrics shared by every evaluator that predicts classes (zero-shot, probes, fine-tuning).

CLIP_benchmark's metric names and definitions (``clip_benchmark/metrics/zeroshot_classification.py``): ``acc1``,
``acc5`` and ``mean_per_class_recall`` (scikit-learn's ``balanced_accuracy_score``), computed in torch (as
torchmetrics' ``multiclass_accuracy`` / ``multiclass_recall`` do: argmax for the top-1 prediction, ``topk`` for top-k;
``tests/test_eval_zero_shot.py`` checks them against a hand computation and scikit-learn). Not importing torchmetrics
(and the SciPy it loads) saves about 1.7 s at the start of every `train` and `eval` process.
"""

from __future__ import annotations

import warnings

import torch


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
    predicted = logits.argmax(dim=1)
    in_top_k = (logits.topk(top_k, dim=1).indices == labels[:, None]).any(dim=1)
    per_class = torch.bincount(labels, minlength=num_classes)
    correct_per_class = torch.bincount(labels[predicted == labels], minlength=num_classes)
    present = per_class > 0
    return {
        "acc1": (predicted == labels).float().mean().item(),
        "acc5": in_top_k.float().mean().item(),
        "mean_per_class_recall": (correct_per_class[present].float() / per_class[present]).mean().item(),
    }
