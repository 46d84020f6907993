"""StdScaling and IsotonicRecalibration on a deliberately mis-scaled model, the quantiles of every
method's predictive, and the before-and-after plot."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression
from torch import nn

from uq_box.methods import IsotonicRecalibration, MVERegression, QuantileRegression, StdScaling
from uq_box.metrics.functional import miscalibration_area
from uq_box.metrics.functional_samples import (
    pit_miscalibration_area,
    quantile_calibration,
    quantile_coverage,
)
from uq_box.models import MLP
from uq_box.viz import plot_recalibration

matplotlib.use("Agg")

FACTOR = 3.0  # the model's std is the true noise std divided by FACTOR: overconfident


class Oracle(nn.Module):
    """The true mean ``sin(2x)`` and ``1 / FACTOR`` of the true std ``0.1 + 0.2 |x|``, as the
    raw outputs of ``NLL()`` (softplus scale)."""

    def __init__(self, factor: float = FACTOR) -> None:
        super().__init__()
        self.factor = factor
        self.unused = nn.Linear(1, 1)  # a parameter for the dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = true_std(x) / self.factor
        return torch.cat([torch.sin(2 * x), torch.log(torch.expm1(std))], dim=-1)


def true_std(x: torch.Tensor) -> torch.Tensor:
    return 0.1 + 0.2 * x.abs()


def data(n: int, seed: int, skewed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 4 * torch.rand(n, 1, generator=g) - 2
    if skewed:  # centred exponential noise, std 1
        noise = torch.empty(n, 1).exponential_(1.0, generator=g) - 1.0
    else:
        noise = torch.randn(n, 1, generator=g)
    return x, torch.sin(2 * x) + true_std(x) * noise


def model(factor: float = FACTOR) -> MVERegression:
    return MVERegression(Oracle(factor))


def test_std_scaling_recovers_the_factor_and_calibrates():
    base = model()
    calib, test = data(3000, 0), data(3000, 1)
    wrapper = StdScaling(base, quantile_levels=[0.05, 0.5, 0.95]).calibrate(calib)
    assert float(wrapper.scale) == pytest.approx(FACTOR, rel=0.03)
    before, after = base.predict_step(test[0]), wrapper.predict_step(test[0])
    area_before = float(miscalibration_area(before["pred"], before["pred_uct"], test[1]))
    area_after = float(miscalibration_area(after["pred"], after["pred_uct"], test[1]))
    assert area_before > 0.25 and area_after < 0.02, (area_before, area_after)
    torch.testing.assert_close(after["pred"], before["pred"])
    torch.testing.assert_close(after["pred_uct"], true_std(test[0]), rtol=0.03, atol=0)
    q = after["quantiles"]
    assert q.shape == (3000, 1, 3)
    assert float(quantile_coverage(q[..., 0], q[..., 2], test[1])) == pytest.approx(0.9, abs=0.02)


def test_isotonic_recalibration_calibrates_the_cdf_and_its_quantiles():
    base = model()
    calib, test = data(3000, 0), data(3000, 1)
    wrapper = IsotonicRecalibration(base, quantile_levels=[0.05, 0.25, 0.5, 0.75, 0.95])
    wrapper.calibrate(calib)
    pit_before = wrapper.pit(*test, calibrated=False)
    pit_after = wrapper.pit(*test)
    area_before = float(pit_miscalibration_area(pit_before))
    area_after = float(pit_miscalibration_area(pit_after))
    assert area_before > 0.1 and area_after < 0.015, (area_before, area_after)
    preds = wrapper.predict_step(test[0])
    gaussian_area = float(miscalibration_area(preds["pred"], preds["pred_uct"], test[1]))
    assert gaussian_area < 0.03, gaussian_area
    torch.testing.assert_close(preds["pred_uct"], true_std(test[0]), rtol=0.06, atol=0)
    observed = quantile_calibration(preds["quantiles"], test[1], wrapper.quantile_levels)
    torch.testing.assert_close(observed, torch.tensor(wrapper.quantile_levels), atol=0.025, rtol=0)
    # the calibrated CDF at the quantiles gives the levels back
    z = (preds["quantiles"][:50, 0] - base.predict_step(test[0][:50])["pred"]) / base.predict_step(
        test[0][:50]
    )["pred_uct"]
    cdf = torch.stack([wrapper.calibrated_cdf(z[:, k : k + 1]) for k in range(5)], -1)[:, 0]
    torch.testing.assert_close(
        cdf, torch.tensor(wrapper.quantile_levels).expand(50, 5), atol=1e-4, rtol=0
    )


def test_isotonic_map_is_sklearns_isotonic_fit_and_beats_std_scaling_on_skewed_noise():
    base = model(factor=1.0)
    calib, test = data(2000, 2, skewed=True), data(2000, 3, skewed=True)
    isotonic = IsotonicRecalibration(base).calibrate(calib)
    z = isotonic.standardized(base.predict_step(calib[0]), calib[1]).double()
    pit = torch.special.ndtr(z).reshape(-1).numpy()
    ecdf = (pit[None, :] <= pit[:, None]).mean(1)
    sklearn_fit = IsotonicRegression(out_of_bounds="clip").fit(pit, ecdf)
    ours = isotonic.recalibrate(torch.from_numpy(pit).reshape(1, 1, -1)).reshape(-1).numpy()
    np.testing.assert_allclose(ours, sklearn_fit.predict(pit), atol=1e-12)
    scaled = StdScaling(base).calibrate(calib)
    area_isotonic = float(pit_miscalibration_area(isotonic.pit(*test)))
    area_scaled = float(pit_miscalibration_area(scaled.pit(*test)))
    assert area_isotonic < 0.02 < area_scaled, (area_isotonic, area_scaled)


def test_recalibration_bad_input():
    base = model()
    with pytest.raises(ValueError, match="`quantile_levels`"):
        StdScaling(base, quantile_levels=[0.5, 1.5])
    with pytest.raises(ValueError, match="`quantile_levels`"):
        base.quantile_levels = 0.0
    with pytest.raises(RuntimeError, match="not calibrated"):
        IsotonicRecalibration(base).predict_step(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="`num_levels`"):
        IsotonicRecalibration(base, num_levels=1)


def test_quantiles_of_every_kind_of_predictive():
    x = data(5, 4)[0]
    base = model(factor=1.0)
    base.quantile_levels = [0.1, 0.5, 0.9]
    q = base.predict_step(x)["quantiles"]
    preds = base.predict_step(x)
    expected = preds["pred"].unsqueeze(-1) + preds["pred_uct"].unsqueeze(-1) * torch.tensor(
        [-1.2815516, 0.0, 1.2815516]
    )
    torch.testing.assert_close(q, expected)  # one Gaussian: exact
    quantile = QuantileRegression(MLP(1, [4], 3))
    quantile.quantile_levels = [0.05, 0.275, 0.5]
    grid = quantile.criterion.quantile_outputs(quantile.model(x))
    q = quantile.predict_step(x)["quantiles"]
    torch.testing.assert_close(q[..., [0, 2]], grid[..., [0, 1]])
    torch.testing.assert_close(q[..., 1], (grid[..., 0] + grid[..., 1]) / 2)
    quantile.quantile_levels = [0.01]
    with pytest.raises(ValueError, match="`quantile_levels`"):
        quantile.predict_step(x)


def test_plot_recalibration_returns_a_figure():
    u = torch.linspace(0.001, 0.999, 200)
    fig = plot_recalibration(u**3, u)
    assert len(fig.axes) == 2
    assert "area" in fig.axes[0].get_legend().get_texts()[1].get_text()
    with pytest.raises(ValueError, match="`pit_after`"):
        plot_recalibration(u, u + 1)
