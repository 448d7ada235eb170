"""Few-shot linear evaluation by closed-form ridge regression: the Soft MoE paper's "10-shot" metric.

Follows big_vision ``evaluators/fewshot_lsr.py`` and vmoe ``evaluate/fewshot.py`` (Puigcerver et al., ICLR 2024,
section 3 and App. B): on frozen pre-logit features, sample k examples per class from the *train* split, standardise
each feature with that k-shot set's mean and (population) std + 1e-5, append a constant bias feature of 100 (large, so
the bias is almost unregularised), regress onto ``2 * onehot - 1`` targets with an L2 penalty, and predict the argmax on
the test split. The solution comes from one eigendecomposition, reused for every l2 value:

    N >= D (primal):  W = (X^T X + l2 I)^-1 X^T Y = Q diag(1 / (eigs + l2)) Q^T X^T Y,   X^T X = Q diag(eigs) Q^T
    D >  N (dual):    W = X^T (X X^T + l2 I)^-1 Y = X^T Q diag(1 / (eigs + l2)) Q^T Y,   X X^T = Q diag(eigs) Q^T

with X of shape ``[N, D]`` (D = features + 1) and Y of shape ``[N, C]``. As in big_vision, a seed draws one random
order per class and each shot count takes a prefix of it (the 1-shot set is inside the 5-shot set), and results are
averaged over seeds. The l2 strength is either fixed (big_vision: 2^10) or swept over 2^-10 .. 2^19 (vmoe's grid). vmoe
picks the sweep's winner by mean rank of *test* accuracy across datasets; here it is picked on examples held out from
the train split, per seed and dataset (a sweep), or per shot count across a suite's datasets by mean rank of that
held-out accuracy (``eval.suite``, which passes its choice back as a mapping shot -> l2), so the test split is never
used for any choice.

Differences from the JAX code, none changing the estimator: the algebra runs in float64 (the bias column of 100 makes
``X^T X`` badly conditioned in float32), ``X^T Y`` is accumulated per class instead of materialising the ``[N, C]``
targets, the per-class orders come from one vectorised sort, and test predictions are made in row chunks, so thousands
of classes need no more memory than the features plus the ``[D, C]`` weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

BIAS_CONSTANT = 100.0
DEFAULT_SHOTS = (1, 5, 10, 25)
DEFAULT_L2_REG = 2.0**10
L2_SWEEP = tuple(2.0**e for e in range(-10, 20))


def _signed_onehot_product(a: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``a^T (2 * onehot(labels) - 1)``, shape ``[r, C]``, for ``a`` of shape ``[N, r]``; never forms the targets."""
    class_sums_cr = torch.zeros(num_classes, a.shape[1], dtype=a.dtype, device=a.device).index_add_(0, labels, a)
    return 2.0 * class_sums_cr.T - a.sum(0)[:, None]


class RidgeProbe:
    """Ridge regression onto ``+-1`` one-hot targets, solvable for any l2 from one eigendecomposition.

    Args:
        features: ``[N, d]`` training (k-shot) features.
        labels: ``[N]`` their classes.
        num_classes: Number of classes C.
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        features = features.double()
        self.mean = features.mean(0, keepdim=True)
        self.std = features.std(0, correction=0, keepdim=True) + 1e-5
        x_nd = self.design(features)
        labels = labels.to(x_nd.device)
        num_points, dim = x_nd.shape
        if num_points >= dim:
            self.eigs, q_dd = torch.linalg.eigh(x_nd.T @ x_nd)
            self.lhs, self.rhs = q_dd, q_dd.T @ _signed_onehot_product(x_nd, labels, num_classes)
        else:
            self.eigs, q_nn = torch.linalg.eigh(x_nd @ x_nd.T)
            self.lhs, self.rhs = x_nd.T @ q_nn, _signed_onehot_product(q_nn, labels, num_classes)

    def design(self, features: torch.Tensor) -> torch.Tensor:
        """Standardised features with the bias column appended: ``[n, d]`` -> ``[n, d + 1]``, float64."""
        x = (features.double().to(self.mean.device) - self.mean) / self.std
        return torch.nn.functional.pad(x, (0, 1), value=BIAS_CONSTANT)

    def weights(self, l2_reg: float) -> torch.Tensor:
        """The ``[d + 1, C]`` ridge solution for one l2 strength (last row: bias)."""
        return (self.lhs / (self.eigs + l2_reg)) @ self.rhs

    def predict(self, features: torch.Tensor, l2_regs: Sequence[float], chunk_size: int = 4096) -> torch.Tensor:
        """Predicted classes ``[len(l2_regs), n]`` for each l2 strength, scoring ``chunk_size`` rows at a time."""
        preds = []
        for chunk in features.split(chunk_size):
            projected = self.design(chunk) @ self.lhs
            preds.append(torch.stack([((projected / (self.eigs + l2)) @ self.rhs).argmax(1) for l2 in l2_regs]))
        return torch.cat(preds, dim=1)


def class_ranks(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Each sample's position within its class under a random per-class order, ``[N]``.

    Taking ``ranks < k`` gives k random examples per class; larger k extend smaller ones, as in big_vision.
    """
    labels = labels.cpu()
    order = torch.randperm(len(labels), generator=generator)
    order = order[torch.argsort(labels[order], stable=True)]
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(labels)
    ranks[order] = torch.arange(len(labels)) - starts[labels[order]]
    return ranks


def _check_args(
    shots: Sequence[int], num_seeds: int, sweep: bool, holdout_per_class: int, train_width: int, test_width: int
) -> None:
    if not shots or min(shots) < 1 or num_seeds < 1:
        raise ValueError(f"Need shots >= 1 and num_seeds >= 1, got shots={tuple(shots)}, num_seeds={num_seeds}.")
    if sweep and holdout_per_class < 1:
        raise ValueError("An l2 sweep needs holdout_per_class >= 1 train examples per class to choose on.")
    if train_width != test_width:
        raise ValueError(
            f"Train features have width {train_width} but test features {test_width}: "
            "extract both splits with the same model."
        )


def _check_class_sizes(
    labels: torch.Tensor, num_classes: int, needed: int, holdout: int, classnames: Sequence[str] | None
) -> None:
    counts = torch.bincount(labels, minlength=num_classes)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < needed:
        name = classnames[smallest] if classnames is not None else f"class {smallest}"
        held = f" (+{holdout} held out per class to choose the l2 strength)" if holdout else ""
        raise ValueError(
            f"{needed - holdout} shots{held} need {needed} training examples per class, but '{name}' has only "
            f"{int(counts[smallest])}: lower the shots, or the holdout, or drop that class."
        )


def _l2_candidates(l2_reg: float | Sequence[float] | Mapping[int, float], shots: Sequence[int]) -> dict[int, tuple]:
    """The l2 strengths each shot count may use: the fixed one, the sweep, or its entry in a per-shot mapping."""
    if isinstance(l2_reg, Mapping):
        missing = [shot for shot in shots if shot not in l2_reg]
        if missing:
            raise ValueError(f"The per-shot l2 mapping has no value for shots {missing}: give one per shot count.")
        return {shot: (float(l2_reg[shot]),) for shot in shots}
    return {shot: (float(l2_reg),) if isinstance(l2_reg, (int, float)) else tuple(l2_reg) for shot in shots}


def _fewshot_run(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    ranks: torch.Tensor,
    shots: int,
    holdout: int,
    l2_regs: Sequence[float],
    num_classes: int,
) -> tuple[float, float, list[float]]:
    """Test accuracy of one seed's k-shot probe, the l2 strength used and the held-out accuracy of every candidate.

    With several candidates, the one with the best accuracy on the held-out train examples is used (ties go to the
    stronger penalty); with one, it is used as is.
    """
    fit = (ranks >= holdout) & (ranks < holdout + shots)
    probe = RidgeProbe(train[0][fit], train[1][fit], num_classes)
    held_accuracy: list[float] = []
    l2 = l2_regs[0]
    if len(l2_regs) > 1:
        held = ranks < holdout
        accuracy = (probe.predict(train[0][held], l2_regs) == train[1][held].to(probe.lhs.device)).double().mean(1)
        held_accuracy = accuracy.tolist()
        l2 = l2_regs[len(l2_regs) - 1 - int(accuracy.flip(0).argmax())]
    preds = probe.predict(test[0], [l2])[0]
    return (preds == test[1].to(preds.device)).double().mean().item(), l2, held_accuracy


def _summarise(runs: list[tuple[float, float, list[float]]]) -> dict[str, float | list[float]]:
    """Mean and sample std of the accuracy over seeds, the per-seed values and l2 strengths, and, for a sweep, the
    held-out train accuracy of each candidate l2 averaged over seeds (what ``eval.suite`` ranks)."""
    accuracies, l2_regs = [acc for acc, _, _ in runs], [l2 for _, l2, _ in runs]
    mean = sum(accuracies) / len(accuracies)
    ddof = 1 if len(accuracies) > 1 else 0
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (len(accuracies) - ddof))
    summary: dict[str, float | list[float]] = {"acc1": mean, "acc1_std": std, "acc1_per_seed": accuracies,
                                               "l2_reg": l2_regs}
    if runs[0][2]:
        summary["holdout_acc1_per_l2"] = torch.tensor([held for _, _, held in runs]).mean(0).tolist()
    return summary


def evaluate_fewshot(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    shots: Sequence[int] = DEFAULT_SHOTS,
    num_seeds: int = 3,
    l2_reg: float | Sequence[float] | Mapping[int, float] = DEFAULT_L2_REG,
    holdout_per_class: int = 10,
    num_classes: int | None = None,
    classnames: Sequence[str] | None = None,
) -> dict[str, dict[str, float | list[float]]]:
    """k-shot ridge-regression accuracy for each shot count, averaged over seeds.

    Args:
        train_features: ``[N, d]`` frozen pre-logit features of the train split (the only split shots come from).
        train_labels: ``[N]`` their classes.
        test_features: ``[M, d]`` features of the test split.
        test_labels: ``[M]`` their classes.
        shots: Examples per class, e.g. ``(1, 5, 10, 25)``.
        num_seeds: Seeds 0..num_seeds-1; each draws its own per-class order.
        l2_reg: A fixed l2 strength (big_vision: 2^10), or a sequence (e.g. ``L2_SWEEP``) to choose from per seed and
            shot count on ``holdout_per_class`` train examples per class kept out of the k-shot sets, or a mapping
            shot count -> l2 chosen elsewhere on those held-out examples (``eval.suite``: same k-shot sets).
        holdout_per_class: Train examples per class held out to choose the l2 strength (with a sweep or mapping).
        num_classes: Number of classes; from ``classnames`` or the largest label when None.
        classnames: Class names, used in error messages.

    Returns:
        ``{"10shot": {"acc1": mean, "acc1_std": sample std over seeds, "acc1_per_seed": [...], "l2_reg": [...]}, ...}``,
        with a sweep also ``"holdout_acc1_per_l2"`` (held-out train accuracy per candidate, mean over seeds).
    """
    sweep = not isinstance(l2_reg, (int, float))
    _check_args(shots, num_seeds, sweep, holdout_per_class, train_features.shape[1], test_features.shape[1])
    holdout = holdout_per_class if sweep else 0
    candidates = _l2_candidates(l2_reg, shots)
    if num_classes is None:
        num_classes = len(classnames) if classnames is not None else int(max(train_labels.max(), test_labels.max())) + 1
    _check_class_sizes(train_labels, num_classes, max(shots) + holdout, holdout, classnames)
    runs = {shot: [] for shot in shots}
    for seed in range(num_seeds):
        ranks = class_ranks(train_labels, num_classes, torch.Generator().manual_seed(seed))
        for shot in shots:
            runs[shot].append(_fewshot_run((train_features, train_labels), (test_features, test_labels), ranks,
                                           shot, holdout, candidates[shot], num_classes))
    return {f"{shot}shot": _summarise(runs[shot]) for shot in shots}
