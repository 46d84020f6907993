import numpy as np
import pytest
import torch
import uncertainty_toolbox as uct
from scipy import stats
from scipy.integrate import quad

from uq_box.metrics import functional as fm


def _case(kind: str, n: int = 400, seed: int = 0):
    """Gaussian predictions whose calibration depends on ``kind``; returns numpy float64 arrays."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    true_std = rng.uniform(0.5, 2.0, n)
    if kind == "heavy_tails":  # curve crosses the diagonal: too many points near and far
        target = mean + true_std * rng.standard_t(df=2, size=n) / np.sqrt(2.0)
    else:
        target = mean + true_std * rng.normal(size=n)
    factor = {"calibrated": 1.0, "over": 0.4, "under": 2.5, "heavy_tails": 1.0}
    std = true_std * factor.get(kind, 1.0)
    if kind == "mixed":  # overconfident on one half, underconfident on the other
        std = true_std * np.where(rng.random(n) < 0.5, 0.3, 3.0)
    return mean, std, target


CASES = ["calibrated", "over", "under", "heavy_tails", "mixed"]


def _torch(*arrays):
    return [torch.from_numpy(a) for a in arrays]


@pytest.mark.parametrize("kind", CASES)
def test_scoring_rules_match_closed_forms(kind):
    mean, std, target = _case(kind)
    nll = -stats.norm.logpdf(target, loc=mean, scale=std).mean()
    assert fm.gaussian_nll(*_torch(mean, std, target)).item() == pytest.approx(nll, rel=1e-12)
    assert fm.gaussian_nll(*_torch(mean, std, target)).item() == pytest.approx(
        uct.nll_gaussian(mean, std, target), rel=1e-12
    )
    assert fm.gaussian_crps(*_torch(mean, std, target)).item() == pytest.approx(
        uct.crps_gaussian(mean, std, target), rel=1e-12
    )


def test_crps_matches_numerical_integral():
    # CRPS(F, y) = int (F(z) - 1{z >= y})^2 dz for N(0.3, 1.7^2) at y = 1.1.
    below = quad(lambda z: stats.norm.cdf(z, 0.3, 1.7) ** 2, -np.inf, 1.1)[0]
    above = quad(lambda z: stats.norm.sf(z, 0.3, 1.7) ** 2, 1.1, np.inf)[0]
    reference = below + above
    crps = fm.gaussian_crps(*_torch(np.array([0.3]), np.array([1.7]), np.array([1.1])))
    assert crps.item() == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("level", [0.5, 0.9, 0.95])
@pytest.mark.parametrize("kind", CASES)
def test_interval_coverage_is_a_direct_count(kind, level):
    mean, std, target = _case(kind)
    half_width = stats.norm.ppf(0.5 + level / 2)
    expected = np.mean((target >= mean - half_width * std) & (target <= mean + half_width * std))
    coverage = fm.interval_coverage(*_torch(mean, std, target), level=level)
    assert coverage.item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("num_bins", [100, 11])
@pytest.mark.parametrize("kind", CASES)
def test_calibration_metrics_match_uncertainty_toolbox(kind, num_bins):
    mean, std, target = _case(kind, seed=num_bins)
    args = _torch(mean, std, target)
    exp_ref, obs_ref = uct.get_proportion_lists_vectorized(mean, std, target, num_bins=num_bins)
    expected, observed = fm.calibration_curve(*args, num_bins=num_bins)
    np.testing.assert_allclose(expected.numpy(), exp_ref, atol=1e-15)
    np.testing.assert_array_equal(observed.numpy(), obs_ref)

    for ours, theirs in [
        (fm.miscalibration_area, uct.miscalibration_area),
        (fm.mean_absolute_calibration_error, uct.mean_absolute_calibration_error),
        (fm.root_mean_squared_calibration_error, uct.root_mean_squared_calibration_error),
    ]:
        reference = theirs(mean, std, target, num_bins=num_bins)
        assert ours(*args, num_bins=num_bins).item() == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("kind", ["heavy_tails", "mixed"])
def test_crossing_cases_cross_the_diagonal(kind):
    expected, observed = fm.calibration_curve(*_torch(*_case(kind)))
    gap = (observed - expected)[1:-1]
    assert (gap > 0).any() and (gap < 0).any()


def test_miscalibration_area_of_hand_made_crossing_curve():
    # The gap goes from +0.2 to -0.2 across one segment of width 0.5: two triangles of
    # area 0.5 * 0.25 * 0.2 each, not the zero a signed trapezoid would give.
    expected = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    observed = torch.tensor([0.0, 0.7, 0.8], dtype=torch.float64)
    area = fm._area_from_proportions(expected, observed)
    assert area.item() == pytest.approx(0.5 * 0.5 * 0.2 + 2 * 0.5 * 0.25 * 0.2)


def test_float32_and_column_inputs():
    mean, std, target = (a.astype(np.float32) for a in _case("mixed"))
    args = [torch.from_numpy(a).unsqueeze(1) for a in (mean, std, target)]
    _, observed = fm.calibration_curve(*args)
    _, obs_ref = uct.get_proportion_lists_vectorized(mean, std, target)
    assert observed.dtype == torch.float32
    np.testing.assert_allclose(observed.numpy(), obs_ref, atol=1e-7)
    assert fm.miscalibration_area(*args).item() == pytest.approx(
        uct.miscalibration_area(mean, std, target), abs=1e-6
    )


def test_bad_inputs_are_named():
    ones = torch.ones(5)
    with pytest.raises(ValueError, match="`std` must be strictly positive"):
        fm.gaussian_nll(ones, torch.zeros(5), ones)
    with pytest.raises(ValueError, match="`target` must have shape"):
        fm.gaussian_crps(ones, ones, torch.ones(5, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        fm.gaussian_crps(ones, ones, torch.ones(5, 2))
    with pytest.raises(ValueError, match="same shape"):
        fm.gaussian_crps(ones, ones, torch.ones(4))
    with pytest.raises(ValueError, match="`level`"):
        fm.interval_coverage(ones, ones, ones, level=1.0)
    with pytest.raises(ValueError, match="`num_bins`"):
        fm.miscalibration_area(ones, ones, ones, num_bins=1)
    with pytest.raises(TypeError, match="`mean` must be a torch.Tensor"):
        fm.gaussian_nll(np.ones(5), ones, ones)


def test_several_targets_pool_all_values():
    """``[N, T]`` predictions score as the ``N T`` values of one flat set."""
    mean, std, target = (torch.from_numpy(a) for a in _case("mixed"))
    n = len(mean) // 2 * 2
    columns = [a[:n].reshape(-1, 2) for a in (mean, std, target)]
    flat = [a[:n] for a in (mean, std, target)]
    for fn in (fm.gaussian_nll, fm.gaussian_crps, fm.interval_coverage, fm.miscalibration_area):
        torch.testing.assert_close(fn(*columns), fn(*flat))
