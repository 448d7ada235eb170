"""Logistic-regression linear probe on L2-normalised frozen features, with a weight-decay sweep on a validation split.

Follows CLIP_benchmark (``clip_benchmark/metrics/linear_probe.py``): features are L2-normalised, a linear layer is
trained with cross-entropy, the weight decay is chosen by a coarse-to-fine search over ``logspace(-6, 2, 97)`` (7
coarse points, then spans 8, 4, 2, 1 around the best) scored on a validation split carved from train, and the final
probe is retrained on the whole train split with the chosen value and scored on the test split.

One deliberate difference: CLIP_benchmark trains with mini-batch AdamW for a fixed number of epochs; here the
(convex) objective ``mean cross-entropy + wd / 2 * ||W||^2`` (bias not penalised) is minimised full-batch with L-BFGS,
as in the CLIP paper's scikit-learn probe (Radford et al. 2021, App. A.3; there ``C = 1 / (wd * N)``). The result
then depends on the weight decay only, not on a learning rate, epoch count or batch order. The loss is accumulated
over row chunks, so memory stays at ``chunk_size x classes`` beyond the features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmsoftmoe_eval.metrics import classification_metrics

WEIGHT_DECAYS = tuple(torch.logspace(-6, 2, 97, dtype=torch.float64).tolist())


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    *,
    max_iter: int = 100,
    chunk_size: int = 65536,
) -> nn.Linear:
    """Multinomial logistic regression fitted full-batch with L-BFGS from a zero start (deterministic).

    Args:
        features: ``[N, d]`` inputs, on the device to train on.
        labels: ``[N]`` classes.
        num_classes: Number of classes C.
        weight_decay: Coefficient of ``wd / 2 * ||W||^2`` added to the mean cross-entropy.
        max_iter: L-BFGS iterations.
        chunk_size: Rows per forward pass inside one loss evaluation.
    """
    probe = nn.Linear(features.shape[1], num_classes, device=features.device, dtype=features.dtype)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")
    labels = labels.to(features.device)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = weight_decay / 2 * probe.weight.pow(2).sum()
        loss.backward()
        total = loss.detach()
        for x, y in zip(features.split(chunk_size), labels.split(chunk_size), strict=True):
            loss = F.cross_entropy(probe(x), y, reduction="sum") / len(features)
            loss.backward()
            total = total + loss.detach()
        return total

    with torch.enable_grad():
        optimizer.step(closure)
    return probe.requires_grad_(False)


def _accuracy(probe: nn.Linear, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (probe(features).argmax(1) == labels.to(features.device)).double().mean().item()


def select_weight_decay(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = 100,
) -> tuple[float, dict[float, float]]:
    """CLIP_benchmark's coarse-to-fine weight-decay search, scored by validation accuracy.

    About 7 evenly spaced grid points first, then the best point and its neighbours at half the spacing, down to
    adjacent points; ties go to the smaller weight decay. Grids of 7 points or fewer are searched exhaustively.

    Args:
        train: ``(features, labels)`` to fit on.
        val: ``(features, labels)`` to score on.
        num_classes: Number of classes.
        weight_decays: Ascending grid.
        max_iter: L-BFGS iterations per fit.

    Returns:
        The chosen weight decay and the validation accuracy of every value tried.
    """
    scores: dict[int, float] = {}

    def score(index: int) -> float:
        if index not in scores:
            probe = fit_logistic(*train, num_classes, weight_decays[index], max_iter=max_iter)
            scores[index] = _accuracy(probe, *val)
        return scores[index]

    last = len(weight_decays) - 1
    step = max(1, last // 6)
    peak = max(range(0, last + 1, step), key=score)
    span = step // 2
    while span > 0:
        peak = max((max(peak - span, 0), peak, min(peak + span, last)), key=score)
        span //= 2
    return weight_decays[peak], {weight_decays[i]: acc for i, acc in sorted(scores.items())}


def _split_train_val(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    num_val = max(1, round(count * val_fraction))
    return order[num_val:], order[:num_val]


def evaluate_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    weight_decays: Sequence[float] = WEIGHT_DECAYS,
    max_iter: int = 100,
) -> dict[str, float]:
    """Logistic-regression probe: acc1, acc5, mean_per_class_recall on test, and the chosen weight decay.

    Args:
        train_features: ``[N, d]`` frozen features of the train split (normalised here); the probe runs on their
            device.
        train_labels: ``[N]`` their classes.
        test_features: ``[M, d]`` features of the test split (normalised here).
        test_labels: ``[M]`` their classes.
        num_classes: Number of classes; the largest label + 1 when None.
        val_fraction: Fraction of the train split held out to choose the weight decay.
        seed: Seed of the train/validation split.
        weight_decays: Ascending weight-decay grid; CLIP_benchmark's by default.
        max_iter: L-BFGS iterations per fit.
    """
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_x = F.normalize(train_features.float(), dim=-1)
    test_x = F.normalize(test_features.float(), dim=-1).to(train_x.device)
    fit_idx, val_idx = _split_train_val(len(train_x), val_fraction, seed)
    weight_decay, _ = select_weight_decay(
        (train_x[fit_idx], train_labels[fit_idx]), (train_x[val_idx], train_labels[val_idx]), num_classes,
        weight_decays, max_iter,
    )
    probe = fit_logistic(train_x, train_labels, num_classes, weight_decay, max_iter=max_iter)
    return {**classification_metrics(probe(test_x), test_labels), "weight_decay": weight_decay}
