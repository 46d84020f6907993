"""Prediction-set metrics by numbers: coverage, set size, size-stratified and per-class coverage."""

import numpy as np
import pytest
import torch

from uq_box.metrics import functional_sets as fs
from uq_box.metrics.sets import SetCoverage, SetSize, SizeStratifiedCoverage

SIZES = [1, 64, 7, 150, 79]  # uneven batches summing to 301


def _sets(n=301, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pred_set = torch.rand(n, c, generator=gen) < torch.rand(n, 1, generator=gen)
    target = torch.randint(0, c, (n,), generator=gen)
    return pred_set, target


def test_by_hand():
    pred_set = torch.tensor(
        [[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool
    )
    target = torch.tensor([0, 2, 1, 1, 1])
    assert fs.set_coverage(pred_set, target).item() == pytest.approx(3 / 5)
    assert fs.mean_set_size(pred_set).item() == pytest.approx(8 / 5)
    coverage, count = fs.size_stratified_coverage(pred_set, target)
    assert count.tolist() == [1, 1, 2, 1]
    torch.testing.assert_close(coverage, torch.tensor([0.0, 1.0, 0.5, 1.0], dtype=torch.float64))
    # sizes 0-1 cover 1/2, sizes 2-3 cover 2/3; at alpha = 0.1 the violation is 0.9 - 0.5
    assert fs.size_stratified_coverage_violation(pred_set, target, 0.1, [1]).item() == (
        pytest.approx(0.4)
    )
    assert fs.size_stratified_coverage_violation(pred_set, target, 0.1).item() == (
        pytest.approx(0.9)
    )
    coverage, count = fs.class_conditional_coverage(pred_set, target)
    assert count.tolist() == [1, 3, 1]
    torch.testing.assert_close(coverage, torch.tensor([1.0, 2 / 3, 0.0], dtype=torch.float64))
    # 0/1 integers work like booleans
    assert fs.set_coverage(pred_set.long(), target) == fs.set_coverage(pred_set, target)


def test_matches_numpy():
    pred_set, target = _sets()
    s, t = pred_set.numpy(), target.numpy()
    covered = s[np.arange(len(t)), t]
    assert fs.set_coverage(pred_set, target).item() == pytest.approx(covered.mean())
    assert fs.mean_set_size(pred_set).item() == pytest.approx(s.sum(1).mean())
    size = s.sum(1)
    coverage, count = fs.size_stratified_coverage(pred_set, target)
    for k in range(s.shape[1] + 1):
        assert count[k] == (size == k).sum()
        if count[k]:
            assert coverage[k].item() == pytest.approx(covered[size == k].mean())


def test_metric_classes_over_uneven_batches():
    pred_set, target = _sets()
    coverage, size, stratified = SetCoverage(), SetSize(), SizeStratifiedCoverage(5)
    for s, t in zip(pred_set.split(SIZES), target.split(SIZES), strict=True):
        coverage.update(s, t)
        size.update(s)
        stratified.update(s, t)
    assert coverage.compute() == fs.set_coverage(pred_set, target)
    assert size.compute() == fs.mean_set_size(pred_set)
    expected = fs.size_stratified_coverage(pred_set, target)
    torch.testing.assert_close(stratified.compute()["coverage"], expected[0])
    assert torch.equal(stratified.compute()["count"], expected[1])
    with pytest.raises(ValueError, match="`num_classes`=5"):
        stratified.update(pred_set[:, :3], target.clamp_max(2))


def test_errors_name_the_argument():
    pred_set, target = _sets(n=4, c=3)
    with pytest.raises(ValueError, match=r"`pred_set` must have shape \[N, C\]"):
        fs.set_coverage(pred_set[0], target)
    with pytest.raises(ValueError, match="`pred_set` must hold booleans"):
        fs.mean_set_size(pred_set.float() * 0.5)
    with pytest.raises(ValueError, match=r"`target` must have shape \[N\] = \[4\]"):
        fs.set_coverage(pred_set, target[:2])
    with pytest.raises(ValueError, match=r"`target` must hold class labels in \[0, 3\)"):
        fs.set_coverage(pred_set, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="`target` must hold integer class labels"):
        fs.class_conditional_coverage(pred_set, target.float())
    with pytest.raises(ValueError, match="`alpha` must be a number in"):
        fs.size_stratified_coverage_violation(pred_set, target, 1.5)
    with pytest.raises(ValueError, match="`size_bins` must be increasing"):
        fs.size_stratified_coverage_violation(pred_set, target, 0.1, [3, 1])
    with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
        SizeStratifiedCoverage(0)
