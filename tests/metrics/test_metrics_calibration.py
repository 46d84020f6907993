"""Adaptive (equal-mass) and classwise ECE: against direct numpy implementations, closed forms,
and the torchmetrics classes over uneven batches."""

import numpy as np
import pytest
import torch

from uq_box.metrics import AdaptiveCalibrationError, ClasswiseCalibrationError
from uq_box.metrics.functional_calibration import (
    adaptive_calibration_error,
    classwise_calibration_error,
)
from uq_box.metrics.functional_classification import expected_calibration_error

SIZES = [1, 64, 7, 150, 79]  # uneven batches summing to 301


def _data(n=301, c=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    probs = (2.0 * torch.randn(n, c, generator=gen, dtype=torch.float64)).softmax(-1)
    noise = torch.randint(0, c, (n,), generator=gen)
    target = torch.where(torch.rand(n, generator=gen) < 0.5, probs.argmax(-1), noise)
    return probs, target


def _numpy_adaptive(probs, target, num_bins):
    confidence, correct = probs.max(1), (probs.argmax(1) == target).astype(float)
    order = np.argsort(confidence, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, num_bins):
        if len(chunk):
            total += len(chunk) * abs(correct[chunk].mean() - confidence[chunk].mean())
    return total / len(probs)


def _numpy_classwise(probs, target, num_bins):
    n, c = probs.shape
    total = 0.0
    for k in range(c):
        p, hit = probs[:, k], (target == k).astype(float)
        index = np.clip(np.ceil(p * num_bins).astype(int) - 1, 0, num_bins - 1)  # (b/B, (b+1)/B]
        for b in range(num_bins):
            inside = index == b
            if inside.any():
                total += inside.sum() / n * abs(hit[inside].mean() - p[inside].mean())
    return total / c


@pytest.mark.parametrize("num_bins", [1, 4, 15, 400])
@pytest.mark.parametrize("seed", [0, 1])
def test_adaptive_and_classwise_match_numpy(seed, num_bins):
    probs, target = _data(seed=seed)
    p, y = probs.numpy(), target.numpy()
    ada = adaptive_calibration_error(probs, target, num_bins)
    cw = classwise_calibration_error(probs, target, num_bins)
    assert ada.dtype == cw.dtype == torch.float64
    assert ada.item() == pytest.approx(_numpy_adaptive(p, y, num_bins), abs=1e-12)
    assert cw.item() == pytest.approx(_numpy_classwise(p, y, num_bins), abs=1e-12)


def test_closed_forms():
    # one bin: |accuracy - mean confidence|, whatever the binning
    probs, target = _data(seed=3)
    conf, correct = probs.max(1).values, (probs.argmax(1) == target).double()
    one_bin = abs(correct.mean() - conf.mean()).item()
    assert adaptive_calibration_error(probs, target, 1).item() == pytest.approx(one_bin, abs=1e-14)
    assert expected_calibration_error(probs, target, 1).item() == pytest.approx(one_bin, abs=1e-14)
    # every point its own bin: the mean of |correct - confidence|
    n = len(target)
    own = (correct - conf).abs().mean().item()
    assert adaptive_calibration_error(probs, target, n).item() == pytest.approx(own, abs=1e-14)
    # equal-mass bins hold N / B points: 6 points of confidence 0.9 (5 right) and 6 of 0.6 (3
    # right), 2 bins of 6
    probs = torch.tensor([[0.9, 0.1]] * 6 + [[0.6, 0.4]] * 6, dtype=torch.float64)
    target = torch.tensor([0] * 5 + [1] + [0] * 3 + [1] * 3)
    expected = 0.5 * abs(5 / 6 - 0.9) + 0.5 * abs(3 / 6 - 0.6)
    assert adaptive_calibration_error(probs, target, 2).item() == pytest.approx(expected)
    # classwise, two classes, one bin each: class 0 freq 8/12 vs mean p0 0.75; class 1 mirrors
    expected_cw = abs(8 / 12 - 0.75)
    assert classwise_calibration_error(probs, target, 1).item() == pytest.approx(expected_cw)
    # perfectly calibrated constant predictions: p = (0.5, 0.3, 0.2) and labels in those shares
    probs = torch.tensor([[0.5, 0.3, 0.2]] * 10, dtype=torch.float64)
    target = torch.tensor([0] * 5 + [1] * 3 + [2] * 2)
    assert classwise_calibration_error(probs, target).item() == pytest.approx(0.0, abs=1e-15)
    assert adaptive_calibration_error(probs, target, 1).item() == pytest.approx(0.0, abs=1e-15)
    # equal-mass bins split tied confidences: 10 bins of one point each, |correct - 0.5| = 0.5
    assert adaptive_calibration_error(probs, target, 10).item() == pytest.approx(0.5)


def test_metric_classes_over_batches():
    probs, target = _data(seed=4)
    ada, cw = AdaptiveCalibrationError(num_bins=7), ClasswiseCalibrationError(num_classes=5)
    for p, y in zip(probs.split(SIZES), target.split(SIZES), strict=True):
        ada.update(p, y)
        cw.update(p.float(), y)
    assert ada.compute().item() == pytest.approx(
        adaptive_calibration_error(probs, target, 7).item(), abs=1e-12
    )
    assert cw.compute().item() == pytest.approx(
        classwise_calibration_error(probs.float(), target).item(), abs=1e-6
    )
    ada.reset()
    with pytest.raises(ValueError, match="before any `update`"):
        ada.compute()
    with pytest.raises(ValueError, match="`num_classes`=5"):
        cw.update(probs[:, :4].softmax(-1), target.clamp_max(3))
    with pytest.raises(ValueError, match="`num_classes` must be a positive integer"):
        ClasswiseCalibrationError(num_classes=0)
    with pytest.raises(ValueError, match="`num_bins`"):
        AdaptiveCalibrationError(num_bins=0)
    with pytest.raises(ValueError, match="`probs` must be probabilities"):
        adaptive_calibration_error(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert set(AdaptiveCalibrationError()._reductions) == {"confidence", "correct"}
