import pytest
import torch

from uq_box.metrics import CRPS, GaussianNLL, IntervalCoverage, MiscalibrationArea
from uq_box.metrics import functional as fm


def _data(n: int = 237):
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(n, 1, generator=gen)
    std = torch.rand(n, 1, generator=gen) + 0.2
    target = mean + 1.5 * std * torch.randn(n, 1, generator=gen)
    return mean, std, target


SIZES = [1, 50, 7, 100, 79]  # uneven batches summing to 237


@pytest.mark.parametrize(
    ("metric", "function"),
    [
        (GaussianNLL(), fm.gaussian_nll),
        (CRPS(), fm.gaussian_crps),
        (IntervalCoverage(level=0.9), lambda *a: fm.interval_coverage(*a, level=0.9)),
        (MiscalibrationArea(num_bins=50), lambda *a: fm.miscalibration_area(*a, num_bins=50)),
    ],
)
def test_uneven_batches_equal_functional_on_concatenation(metric, function):
    mean, std, target = _data()
    for batch in zip(*(t.split(SIZES) for t in (mean, std, target)), strict=True):
        metric.update(*batch)
    assert metric.compute().item() == pytest.approx(function(mean, std, target).item(), rel=1e-5)

    metric.reset()
    metric.update(mean[:10], std[:10], target[:10])
    reference = function(mean[:10], std[:10], target[:10])
    assert metric.compute().item() == pytest.approx(reference.item(), rel=1e-5)


def test_states_reduce_for_ddp():
    assert GaussianNLL()._reductions.keys() == {"total", "count"}
    miscal = MiscalibrationArea()
    assert set(miscal._reductions) == {"mean", "std", "target"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="`level`"):
        IntervalCoverage(level=95)
    with pytest.raises(ValueError, match="`num_bins`"):
        MiscalibrationArea(num_bins=0)
    with pytest.raises(ValueError, match="`std` must be strictly positive"):
        CRPS().update(torch.zeros(3), -torch.ones(3), torch.zeros(3))
