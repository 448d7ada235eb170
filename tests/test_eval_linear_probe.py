"""The logistic-regression probe: the objective against scikit-learn, accuracy, and weight-decay selection on val."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from mmsoftmoe_eval.linear_probe import evaluate_linear_probe, fit_logistic, select_weight_decay


def clusters(num_classes, per_class, dim, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat(per_class)
    return means[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels


def test_fit_matches_sklearn_logistic_regression():
    """Same convex objective: mean CE + wd/2 ||W||^2 is sklearn's C = 1 / (wd * N), unpenalised intercept."""
    features, labels = clusters(4, 40, 6, 1.0, seed=0)
    features = F.normalize(features, dim=-1).double()
    weight_decay = 1e-2
    probe = fit_logistic(features, labels, 4, weight_decay, max_iter=500)
    reference = LogisticRegression(C=1 / (weight_decay * len(features)), tol=1e-10, max_iter=5000)
    reference.fit(features.numpy(), labels.numpy())
    probabilities = torch.softmax(probe(features), dim=1)
    torch.testing.assert_close(probabilities, torch.from_numpy(reference.predict_proba(features.numpy())),
                               atol=1e-4, rtol=1e-4)


def test_separable_data_beats_chance_and_selection_ignores_test_labels():
    train_x, train_y = clusters(10, 40, 16, 0.3, seed=1)
    test_x, test_y = clusters(10, 10, 16, 0.3, seed=1)
    result = evaluate_linear_probe(train_x, train_y, test_x, test_y)
    assert result["acc1"] > 0.9 and result["mean_per_class_recall"] > 0.9  # chance is 0.1
    assert set(result) == {"acc1", "acc5", "mean_per_class_recall", "weight_decay"}
    scrambled = evaluate_linear_probe(train_x, train_y, test_x, test_y.roll(1))
    assert scrambled["weight_decay"] == result["weight_decay"]
    assert scrambled["acc1"] < 0.3


def test_weight_decay_is_the_validation_argmax():
    """Noisy, overlapping classes so that the weight decay changes the validation accuracy."""
    train = clusters(5, 30, 12, 1.5, seed=2)
    val = clusters(5, 20, 12, 1.5, seed=3)
    grid = (1e-6, 1e-3, 1e-1, 1.0, 10.0)
    chosen, scores = select_weight_decay(train, val, 5, grid, max_iter=50)
    expected = []
    for weight_decay in grid:
        probe = fit_logistic(*train, 5, weight_decay, max_iter=50)
        expected.append((probe(val[0]).argmax(1) == val[1]).float().mean().item())
    assert list(scores.values()) == pytest.approx(expected)
    assert len(set(expected)) > 1
    assert chosen == grid[expected.index(max(expected))]


def test_coarse_to_fine_search_visits_few_points_of_the_default_grid():
    train = clusters(3, 20, 4, 1.0, seed=4)
    val = clusters(3, 10, 4, 1.0, seed=5)
    _, scores = select_weight_decay(train, val, 3, max_iter=20)
    assert 7 <= len(scores) <= 7 + 2 * 4
