"""Quantile regression by numbers.

- the pinball loss equals its hand formula and is minimized by the empirical quantile;
- the Gaussian-equivalent std of exact Gaussian quantiles is the Gaussian's std;
- on the toy data the fitted quantiles hold the right fractions of fresh test points below them
  and follow the true heteroscedastic noise;
- the prediction contract, the output-width and level errors, multi-target layout, the CLI config.
"""

import json
import math
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn

import uq_box.cli as cli
from uq_box.datamodules import ToyHeteroscedasticDatamodule
from uq_box.datamodules.toy import toy_heteroscedastic_function, toy_heteroscedastic_noise_std
from uq_box.losses import NLL, PinballLoss, pinball_loss
from uq_box.methods.quantile import QuantileRegression
from uq_box.models import MLP

CONFIG = Path(__file__).parents[2] / "configs" / "toy_heteroscedastic" / "quantile.yaml"
GAUSSIAN_METRICS = {"nll", "nll_gaussian", "rmse", "crps", "coverage_95", "miscalibration_area"}


class FixedOutputs(nn.Module):
    """A 'network' that returns given outputs whatever the input."""

    def __init__(self, outputs):
        super().__init__()
        self.register_buffer("outputs", outputs)
        self.n_outputs = outputs.shape[-1]

    def forward(self, x):
        return self.outputs[: len(x)]


# -- 1. the pinball loss ---------------------------------------------------------------------------
def test_pinball_loss_by_hand():
    loss = PinballLoss((0.1, 0.5, 0.9))
    outputs = torch.tensor([[1.0, 2.0, 3.0]])
    # residuals y - f = 1.5, 0.5, -0.5 -> 0.1 * 1.5, 0.5 * 0.5, (0.9 - 1) * (-0.5)
    assert loss(outputs, torch.tensor([[2.5]])).item() == pytest.approx((0.15 + 0.25 + 0.05) / 3)

    generator = torch.Generator().manual_seed(0)
    levels = (0.05, 0.3, 0.5, 0.95)
    outputs = torch.randn(3, 20, 2 * len(levels), generator=generator)  # [S, N, T * Q]
    target = torch.randn(20, 2, generator=generator)
    expected = 0.0
    for s in range(3):
        for n in range(20):
            for t in range(2):
                for k, q in enumerate(levels):
                    r = (target[n, t] - outputs[s, n, t * len(levels) + k]).item()
                    expected += q * r if r >= 0 else (q - 1) * r
    expected /= 3 * 20 * 2 * len(levels)
    assert PinballLoss(levels)(outputs, target).item() == pytest.approx(expected, rel=1e-5)
    # the elementwise function
    r = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(pinball_loss(-r, torch.zeros(3), 0.25), torch.tensor([1.5, 0, 0.75]))


def test_pinball_loss_is_minimized_by_the_empirical_quantile():
    y = torch.from_numpy(np.random.default_rng(0).standard_normal(999)).float().unsqueeze(-1)
    for q in (0.05, 0.5, 0.9):
        loss = PinballLoss((q,))
        best = float(np.quantile(y.numpy(), q, method="inverted_cdf"))
        candidates = torch.linspace(best - 0.5, best + 0.5, 201)
        values = torch.stack([loss(c.expand(999, 1), y) for c in candidates])
        assert loss(torch.full((999, 1), best), y) <= values.min() + 1e-7
        assert abs(candidates[values.argmin()].item() - best) < 0.02


@pytest.mark.parametrize("levels", [(0.05, 0.5, 0.95), (0.1, 0.25, 0.5, 0.95), (0.5, 0.8)])
def test_gaussian_equivalent_std_of_gaussian_quantiles(levels):
    mu, sigma = torch.tensor([[0.3], [-2.0]]), torch.tensor([[0.5], [1.7]])
    z = torch.special.ndtri(torch.tensor(levels, dtype=torch.float64)).float()
    outputs = mu + sigma * z  # [2, Q]: exact quantiles of N(mu, sigma^2)
    median, std = PinballLoss(levels).mean_and_std(outputs)
    torch.testing.assert_close(median, mu)
    torch.testing.assert_close(std, sigma)
    # for a central interval this is (upper - lower) / (2 z)
    if levels[0] == 1 - levels[-1]:
        z_hi = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(levels[-1]))
        torch.testing.assert_close(std, (outputs[:, -1:] - outputs[:, :1]) / (2 * z_hi))


def test_pinball_loss_argument_errors():
    for bad in [(), (0.0, 0.5), (0.5, 1.0), (0.2, 0.5, 0.4), (0.5, 0.5), (-0.1,)]:
        with pytest.raises(ValueError, match="`quantiles`"):
            PinballLoss(bad)
    with pytest.raises(TypeError, match="`quantiles`"):
        PinballLoss(("a", 0.5))
    with pytest.raises(ValueError, match="0.5"):
        PinballLoss((0.1, 0.9)).mean_and_std(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="multiple of len"):
        PinballLoss((0.1, 0.5, 0.9))(torch.zeros(4, 4), torch.zeros(4, 1))


# -- 2. the method: contract and errors ------------------------------------------------------------
def test_contract_median_sorted_quantiles_and_gaussian_std():
    raw = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 1.0]])  # the second row crosses
    method = QuantileRegression(FixedOutputs(raw))
    preds = method.predict_step(torch.zeros(2, 1))
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct", "lower", "upper"):
        assert preds[key].shape == (2, 1), key
    assert preds["quantiles"].shape == (2, 3)
    assert preds["samples"].shape == (1, 2, 1)
    torch.testing.assert_close(preds["quantiles"], torch.tensor([[0.0, 1.0, 2.0], [-1.0, 1, 3]]))
    torch.testing.assert_close(preds["pred"], torch.tensor([[1.0], [1.0]]))
    torch.testing.assert_close(preds["lower"], torch.tensor([[0.0], [-1.0]]))
    torch.testing.assert_close(preds["upper"], torch.tensor([[2.0], [3.0]]))
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.95))
    torch.testing.assert_close(preds["pred_uct"], torch.tensor([[2.0], [4.0]]) / (2 * z))
    torch.testing.assert_close(preds["aleatoric_uct"], preds["pred_uct"])
    assert (preds["epistemic_uct"] == 0).all()
    assert method.quantiles == (0.05, 0.5, 0.95)


def test_multi_target_layout():
    torch.manual_seed(0)
    method = QuantileRegression(MLP(3, [8], 6), quantiles=[0.1, 0.5, 0.9])
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    terms, outputs = method.loss(x, y)
    assert set(terms) == {"loss", "pinball"}
    torch.testing.assert_close(terms["loss"], PinballLoss((0.1, 0.5, 0.9))(outputs, y))
    preds = method.predict_step(x)
    assert preds["quantiles"].shape == (5, 2, 3)
    assert preds["pred"].shape == preds["lower"].shape == preds["pred_uct"].shape == (5, 2)
    raw = method.model(x).reshape(5, 2, 3).sort(-1).values
    torch.testing.assert_close(preds["pred"], raw[..., 1])


def test_output_width_and_level_errors():
    with pytest.raises(ValueError, match="`n_outputs`.*`quantiles`"):
        QuantileRegression(MLP(1, [8], 2))
    with pytest.raises(ValueError, match="`n_outputs`"):
        QuantileRegression(MLP(1, [8], 3), quantiles=(0.1, 0.5, 0.7, 0.9))
    # a network without `n_outputs`: caught at the first loss
    method = QuantileRegression(nn.Linear(1, 2))
    with pytest.raises(ValueError, match="`quantiles`.*needs 3.*`n_outputs` to 3"):
        method.loss(torch.zeros(4, 1), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="`quantiles`.*0.5"):
        QuantileRegression(MLP(1, [8], 2), quantiles=(0.05, 0.95))
    with pytest.raises(ValueError, match="`quantiles`"):
        QuantileRegression(MLP(1, [8], 3), quantiles=(0.5, 0.05, 0.95))
    with pytest.raises(ValueError, match="`criterion`"):
        QuantileRegression(MLP(1, [8], 3)).check_criterion(NLL())


# -- 3. fitted on the toy data -----------------------------------------------------------------------
EPOCHS = 40


@pytest.fixture(scope="module")
def fitted():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(n_points=2000, val_fraction=0.1, n_test=5000, batch_size=64)
    method = QuantileRegression(
        MLP(1, [50, 50], 3),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=EPOCHS),
    )
    trainer = quiet_trainer(max_epochs=EPOCHS, check_val_every_n_epoch=20)
    trainer.fit(method, dm)
    logged = dict(trainer.logged_metrics)
    return method, dm, logged, trainer.test(method, dm, verbose=False)[0]


def test_fitted_quantiles_hold_the_right_fractions(fitted):
    method, dm, _, metrics = fitted
    preds = method.predict_step(dm.X_test)
    below = (dm.Y_test < preds["quantiles"]).float().mean(0)  # 5000 fresh points
    for got, level in zip(below.tolist(), (0.05, 0.5, 0.95), strict=True):
        assert got == pytest.approx(level, abs=0.03), below
    inside = ((dm.Y_test >= preds["lower"]) & (dm.Y_test <= preds["upper"])).float().mean()
    assert metrics["test_coverage"] == pytest.approx(inside.item(), abs=1e-6)
    assert metrics["test_coverage"] == pytest.approx(0.9, abs=0.04)
    by_hand = PinballLoss()(method.model(dm.X_test).detach(), dm.Y_test)  # no crossing here
    assert metrics["test_pinball"] == pytest.approx(by_hand.item(), rel=1e-4)
    assert set(metrics) == {f"test_{k}" for k in GAUSSIAN_METRICS | {"coverage", "pinball"}}
    assert metrics["test_miscalibration_area"] < 0.1, metrics
    assert metrics["test_rmse"] < 0.36, metrics


def test_fitted_quantiles_follow_the_true_noise(fitted):
    method, _, _, _ = fitted
    x = torch.linspace(-3.5, 3.5, 141).unsqueeze(-1)
    preds = method.predict_step(x)
    mean, std = toy_heteroscedastic_function(x), toy_heteroscedastic_noise_std(x)
    z = torch.special.ndtri(torch.tensor([0.05, 0.5, 0.95])).unsqueeze(0)
    true = mean + std * z  # [141, 3]
    error = (preds["quantiles"] - true).abs().mean(0)
    assert (error < 0.1).all(), error
    # the interval width tracks the noise level (0.05 .. 0.45)
    width = (preds["upper"] - preds["lower"])[:, 0]
    assert torch.corrcoef(torch.stack([width, std[:, 0]]))[0, 1] > 0.9
    torch.testing.assert_close(preds["pred_uct"], (preds["upper"] - preds["lower"]) / (2 * z[0, 2]))


def test_logged_terms_are_named_pinball(fitted):
    _, _, logged, _ = fitted
    assert {"train_loss", "train_pinball", "val_loss", "val_pinball", "val_coverage"} <= set(
        logged
    ), sorted(logged)
    assert "train_nll" not in logged


# -- 4. the CLI config -------------------------------------------------------------------------------
def test_cli_config_fits_and_tests(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    cli.main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--trainer.max_epochs=2",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_model_summary=false",
        ]
    )
    (path,) = tmp_path.glob("*/version_*/test_metrics.json")
    metrics = json.loads(path.read_text())
    assert set(metrics) == {f"test_{k}" for k in GAUSSIAN_METRICS | {"coverage", "pinball"}}
    assert all(math.isfinite(v) for v in metrics.values()), metrics
