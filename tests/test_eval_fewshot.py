"""The closed-form few-shot ridge probe against a direct linear solve, on separable, random and poisoned data."""

import pytest
import torch
import torch.nn.functional as F

from mmsoftmoe_eval.fewshot import BIAS_CONSTANT, L2_SWEEP, RidgeProbe, class_ranks, evaluate_fewshot


def reference_weights(features, labels, num_classes, l2, dual):
    """big_vision's estimator written out with torch.linalg.solve on the normal equations."""
    x = features.double()
    x = (x - x.mean(0)) / (x.std(0, correction=0) + 1e-5)
    x = torch.cat([x, torch.full((len(x), 1), BIAS_CONSTANT, dtype=x.dtype)], dim=1)
    y = 2.0 * F.one_hot(labels, num_classes).double() - 1.0
    if dual:
        return x.T @ torch.linalg.solve(x @ x.T + l2 * torch.eye(len(x), dtype=x.dtype), y)
    return torch.linalg.solve(x.T @ x + l2 * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)


@pytest.mark.parametrize(("num_points", "dim", "dual"), [(200, 12, False), (20, 50, True)])
@pytest.mark.parametrize("l2", [2.0**-3, 2.0**10])
def test_ridge_equals_direct_solve(num_points, dim, dual, l2):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(num_points, dim, generator=generator) * 3 + 1
    labels = torch.arange(num_points) % 5
    probe = RidgeProbe(features, labels, 5)
    assert (probe.lhs.shape[1] == num_points) == dual  # the branch under test really ran
    expected = reference_weights(features, labels, 5, l2, dual)
    torch.testing.assert_close(probe.weights(l2), expected, rtol=1e-6, atol=1e-8)
    test = torch.randn(31, dim, generator=generator)
    assert torch.equal(probe.predict(test, [l2], chunk_size=8)[0], (probe.design(test) @ expected).argmax(1))


def gaussian_classes(num_classes, per_class, dim, spread, generator):
    means = torch.randn(num_classes, dim, generator=generator) * 3
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return means[labels] + spread * torch.randn(len(labels), dim, generator=generator), labels, means


def test_separable_features_reach_100_percent():
    generator = torch.Generator().manual_seed(1)
    train_x, train_y, means = gaussian_classes(10, 30, 32, 0.5, generator)
    test_y = torch.arange(10).repeat_interleave(20)
    test_x = means[test_y] + 0.5 * torch.randn(len(test_y), 32, generator=generator)
    result = evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5, 10))
    assert result["10shot"]["acc1"] == 1.0 and result["5shot"]["acc1"] >= 0.99
    assert len(result["10shot"]["acc1_per_seed"]) == 3 and result["10shot"]["l2_reg"] == [2.0**10] * 3


def test_random_labels_score_chance():
    generator = torch.Generator().manual_seed(2)
    train_x, test_x = torch.randn(600, 16, generator=generator), torch.randn(2000, 16, generator=generator)
    train_y, test_y = torch.arange(600) % 10, torch.randint(0, 10, (2000,), generator=generator)
    result = evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(10, 25))
    for shot in ("10shot", "25shot"):
        assert abs(result[shot]["acc1"] - 0.1) < 0.03


def test_kshot_sets_come_from_train_only():
    """Test images of class c sit on class c+1's mean: any fit on test data would score above 0 on them."""
    generator = torch.Generator().manual_seed(3)
    train_x, train_y, means = gaussian_classes(6, 50, 16, 0.3, generator)
    test_y = torch.arange(6).repeat_interleave(40)
    test_x = means[(test_y + 1) % 6] + 0.3 * torch.randn(len(test_y), 16, generator=generator)
    swept = evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(1, 10, 25), l2_reg=L2_SWEEP)
    for shot in swept.values():
        assert shot["acc1"] == 0.0
    # The l2 choice ignores the test split: scrambling the test labels changes the accuracy, not the choice.
    clean = evaluate_fewshot(train_x, train_y, test_x, (test_y + 1) % 6, shots=(1, 10, 25), l2_reg=L2_SWEEP)
    for key in swept:
        assert clean[key]["acc1"] == 1.0
        assert clean[key]["l2_reg"] == swept[key]["l2_reg"]


def test_sweep_picks_the_best_l2_on_held_out_train_examples():
    generator = torch.Generator().manual_seed(4)
    train_x, train_y, _ = gaussian_classes(4, 40, 24, 4.0, generator)  # overlapping classes: l2 matters
    test_x, test_y = torch.randn(10, 24, generator=generator), torch.arange(10) % 4
    grid = (2.0**-5, 2.0**3, 2.0**8, 2.0**14)
    result = evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(5,), l2_reg=grid, holdout_per_class=15)
    per_seed = []
    for seed in range(3):
        ranks = class_ranks(train_y, 4, torch.Generator().manual_seed(seed))
        fit, held = (ranks >= 15) & (ranks < 20), ranks < 15
        accuracies = []
        for l2 in grid:
            weights = reference_weights(train_x[fit], train_y[fit], 4, l2, dual=True)
            mean, std = train_x[fit].double().mean(0), train_x[fit].double().std(0, correction=0) + 1e-5
            design = F.pad((train_x[held].double() - mean) / std, (0, 1), value=BIAS_CONSTANT)
            accuracies.append(((design @ weights).argmax(1) == train_y[held]).double().mean().item())
        best = max(accuracies)
        expected = max(l2 for l2, acc in zip(grid, accuracies, strict=True) if acc == best)
        assert result["5shot"]["l2_reg"][seed] == expected
        per_seed.append(accuracies)
    # What the suite ranks: each candidate's held-out accuracy, averaged over seeds.
    assert result["5shot"]["holdout_acc1_per_l2"] == pytest.approx(torch.tensor(per_seed).mean(0).tolist())


def test_per_shot_l2_fits_the_same_kshot_sets_as_the_sweep():
    """A mapping shot -> l2 (the suite's choice) keeps the held-out examples out of the k-shot sets."""
    generator = torch.Generator().manual_seed(5)
    train_x, train_y, means = gaussian_classes(4, 30, 24, 4.0, generator)
    test_y = torch.arange(4).repeat_interleave(25)
    test_x = means[test_y] + 4.0 * torch.randn(len(test_y), 24, generator=generator)
    result = evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(2, 5), num_seeds=2,
                              l2_reg={2: 2.0**3, 5: 2.0**-2}, holdout_per_class=10)
    for shot, l2 in ((2, 2.0**3), (5, 2.0**-2)):
        for seed in range(2):
            ranks = class_ranks(train_y, 4, torch.Generator().manual_seed(seed))
            fit = (ranks >= 10) & (ranks < 10 + shot)
            weights = reference_weights(train_x[fit], train_y[fit], 4, l2, dual=True)
            mean, std = train_x[fit].double().mean(0), train_x[fit].double().std(0, correction=0) + 1e-5
            design = F.pad((test_x.double() - mean) / std, (0, 1), value=BIAS_CONSTANT)
            accuracy = ((design @ weights).argmax(1) == test_y).double().mean().item()
            assert result[f"{shot}shot"]["acc1_per_seed"][seed] == pytest.approx(accuracy, abs=1e-12)
        assert result[f"{shot}shot"]["l2_reg"] == [l2, l2] and "holdout_acc1_per_l2" not in result[f"{shot}shot"]
    with pytest.raises(ValueError, match=r"no value for shots \[5\]"):
        evaluate_fewshot(train_x, train_y, test_x, test_y, shots=(2, 5), l2_reg={2: 1.0})


def test_class_ranks_are_per_class_permutations():
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 1, 0, 2, 2])
    first = class_ranks(labels, 3, torch.Generator().manual_seed(0))
    for c in range(3):
        assert sorted(first[labels == c].tolist()) == list(range(int((labels == c).sum())))
    others = [class_ranks(labels, 3, torch.Generator().manual_seed(s)) for s in range(1, 5)]
    assert any(not torch.equal(first, other) for other in others)


def test_bad_inputs_raise_clear_errors():
    features, labels = torch.randn(23, 4), torch.tensor([0] * 10 + [1] * 10 + [2] * 3)
    with pytest.raises(ValueError, match="'zebra' has only 3"):
        evaluate_fewshot(features, labels, features, labels, shots=(5,), classnames=["ant", "bee", "zebra"])
    with pytest.raises(ValueError, match=r"\+10 held out"):
        evaluate_fewshot(features, labels, features, labels, shots=(1,), l2_reg=L2_SWEEP)
    with pytest.raises(ValueError, match="width 4 but test features 5"):
        evaluate_fewshot(features, labels, torch.randn(3, 5), labels[:3], shots=(1,))
