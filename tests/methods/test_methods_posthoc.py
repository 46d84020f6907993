"""Post-hoc calibration by numbers: split conformal regression and temperature scaling.

- the conformal quantile is the ceil((n + 1)(1 - alpha))-th smallest score, as numpy computes it;
- the finite-sample guarantee: over many calibration/test draws of an exact synthetic model with a
  wrong noise level, the average coverage equals its exact value k / (n + 1) >= 1 - alpha;
- on the toy data, conformal intervals of an under-trained MVE and quantile network reach the
  nominal coverage on 5000 fresh points, through ``calibrate`` and through Lightning's loops;
- temperature scaling recovers the temperature of a 5x over-confident classifier, matches a grid
  search, lowers ECE and NLL and keeps the accuracy;
- the calibration split of the data modules, and the errors.
"""

import math
import warnings
from functools import partial

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn

from uq_box.datamodules import ArrayDataModule, ToyHeteroscedasticDatamodule
from uq_box.datamodules.toy import toy_heteroscedastic_function, toy_heteroscedastic_noise_std
from uq_box.methods import (
    DeepEnsembleClassification,
    DeterministicClassification,
    DeterministicRegression,
    MVERegression,
)
from uq_box.methods.posthoc import (
    ConformalRegression,
    TemperatureScaling,
    conformal_quantile,
    conformal_rank,
    tempered_nll,
)
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.methods.quantile import QuantileRegression
from uq_box.metrics.functional_classification import expected_calibration_error
from uq_box.models import MLP


# -- 1. the calibration split ----------------------------------------------------------------------
def test_array_datamodule_calibration_split():
    x, y = torch.randn(10, 2), torch.randn(10)
    dm = ArrayDataModule(x, y, X_test=x[:4], y_test=y[:4], X_calib=x[:7], y_calib=y[:7])
    assert dm.has_split("calib") and not dm.has_split("val")
    assert "calib" in dm.splits
    torch.testing.assert_close(dm.X_calib, x[:7])
    assert dm.Y_calib.shape == (7, 1)  # 1-D regression targets become a column, as elsewhere
    assert dm.split("calib")[0] is dm.X_calib
    batches = list(dm.calib_dataloader())
    assert [len(b["input"]) for b in batches] == [7]
    torch.testing.assert_close(batches[0]["input"], x[:7])  # in order
    # the same checks as every split
    with pytest.raises(ValueError, match="`X_calib` was given without `y_calib`"):
        ArrayDataModule(x, y, X_calib=x)
    with pytest.raises(ValueError, match="`X_calib` has 10 rows but `y_calib` has 3"):
        ArrayDataModule(x, y, X_calib=x, y_calib=y[:3])
    with pytest.raises(ValueError, match="`y_calib` contains 1 non-finite"):
        ArrayDataModule(x, y, X_calib=x, y_calib=torch.tensor([math.nan] + [0.0] * 9))
    plain = ArrayDataModule(x, y)
    assert not plain.has_split("calib")
    with pytest.raises(ValueError, match="no 'calib' split"):
        plain.calib_dataloader()
    with pytest.raises(ValueError, match="no 'calib' split"):
        _ = plain.X_calib


def test_toy_calibration_split_leaves_the_other_splits_unchanged():
    plain = ToyHeteroscedasticDatamodule(n_points=100, n_test=50, seed=3)
    with_calib = ToyHeteroscedasticDatamodule(n_points=100, n_test=50, seed=3, n_calib=40)
    assert not plain.has_split("calib")
    assert with_calib.X_calib.shape == with_calib.Y_calib.shape == (40, 1)
    for name in ("X_train", "Y_train", "X_val", "Y_val", "X_test", "Y_test"):
        assert torch.equal(getattr(plain, name), getattr(with_calib, name)), name
    assert not torch.equal(with_calib.X_calib, with_calib.X_test[:40])  # an independent draw
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="`n_calib`"):
            ToyHeteroscedasticDatamodule(n_calib=bad)


# -- 2. the conformal quantile ---------------------------------------------------------------------
def test_conformal_quantile_matches_numpy():
    rng = np.random.default_rng(0)
    for n, alpha in [(1000, 0.1), (37, 0.2), (250, 0.05), (9, 0.1)]:
        scores = rng.exponential(size=n)
        k = math.ceil((n + 1) * (1 - alpha))
        assert conformal_rank(n, alpha) == k
        expected = np.sort(scores)[k - 1]
        got = conformal_quantile(torch.from_numpy(scores), alpha)
        assert got.item() == expected
        assert np.quantile(scores, k / n, method="inverted_cdf") == expected
        # at least a 1 - alpha share of the n + 1 scores (with +inf) is below it
        assert (np.sum(scores <= expected) + 0) / (n + 1) >= 1 - alpha
    # exact arithmetic where floats overshoot: 100 * (1 - 0.1) = 90.00000000000001 in floats
    assert conformal_rank(99, 0.1) == 90 and conformal_rank(19, 0.05) == 19
    # too few points for alpha: infinite
    assert conformal_rank(8, 0.1) == 9
    assert conformal_quantile(torch.rand(8), 0.1).item() == math.inf
    # one quantile per column
    scores = torch.rand(200, 3)
    got = conformal_quantile(scores, 0.1)
    for t in range(3):
        assert got[t] == scores[:, t].sort().values[conformal_rank(200, 0.1) - 1]


class FixedGaussian(nn.Module):
    """Outputs (true mean, scale of a constant, wrong std) for the NLL criterion."""

    n_outputs = 2

    def __init__(self, std):
        super().__init__()
        self.raw = math.log(math.expm1(std))  # softplus(raw) = std

    def forward(self, x):
        mean = toy_heteroscedastic_function(x)
        return torch.cat([mean, torch.full_like(mean, self.raw)], dim=-1)


def draw(n, generator):
    x = -4.0 + 8.0 * torch.rand(n, 1, generator=generator)
    noise = toy_heteroscedastic_noise_std(x) * torch.randn(n, 1, generator=generator)
    return x, toy_heteroscedastic_function(x) + noise


@pytest.mark.parametrize(("n", "alpha", "score"), [(10, 0.1, "normalized"), (49, 0.2, "absolute")])
def test_finite_sample_guarantee_over_repeated_draws(n, alpha, score):
    """E[coverage] over calibration sets and test points is k / (n + 1) exactly (no ties).

    With n = 10 and alpha = 0.1, k = 10: 10/11 = 0.909 (the uncorrected rank ceil(n (1 - alpha))
    = 9 would give 9/11 = 0.818). With n = 49 and alpha = 0.2, k = 40: exactly 0.8.
    """
    generator = torch.Generator().manual_seed(1)
    conformal = ConformalRegression(MVERegression(FixedGaussian(std=0.1)), alpha=alpha, score=score)
    draws, m = 400, 200
    coverages = []
    for _ in range(draws):
        conformal.calibrate(draw(n, generator))
        x, y = draw(m, generator)
        preds = conformal.predict_step(x)
        coverages.append(((y >= preds["lower"]) & (y <= preds["upper"])).float().mean().item())
    coverages = torch.tensor(coverages)
    mean, standard_error = coverages.mean().item(), coverages.std().item() / math.sqrt(draws)
    k = conformal_rank(n, alpha)
    assert abs(mean - k / (n + 1)) < 4 * standard_error, (mean, k / (n + 1), standard_error)
    assert 1 - alpha - 4 * standard_error < mean < 1 - alpha + 1 / (n + 1) + 4 * standard_error
    # while the model's own 1 - alpha Gaussian interval (std 0.1 instead of 0.05 .. 0.45) is off
    x, y = draw(5000, generator)
    raw = conformal.model.predict_step(x)
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - alpha / 2))
    assert ((y - raw["pred"]).abs() <= z * raw["pred_uct"]).float().mean() < 1 - alpha - 0.2


# -- 3. fitted methods on the toy data -------------------------------------------------------------
ALPHA = 0.1
N_CALIB, N_TEST = 1000, 5000


@pytest.fixture(scope="module")
def toy():
    seed_everything(0)
    dm = ToyHeteroscedasticDatamodule(n_points=500, n_test=N_TEST, n_calib=N_CALIB, seed=0)
    optimizer = partial(torch.optim.Adam, lr=3e-3)
    mve = MVERegression(MLP(1, [50, 50], 2), optimizer=optimizer)
    quiet_trainer(max_epochs=5, limit_val_batches=0).fit(mve, dm)
    quantile = QuantileRegression(MLP(1, [50, 50], 3), optimizer=optimizer)
    quiet_trainer(max_epochs=5, limit_val_batches=0).fit(quantile, dm)
    return dm, {"mve": mve, "quantile": quantile}


def coverage_band(n, m, alpha):
    """Where the coverage on m fresh points may fall: [1 - alpha, 1 - alpha + 1/(n+1)] widened by
    3 standard errors. Given the calibration set the coverage itself varies (Beta, variance about
    alpha (1 - alpha) / n), and m test points add the binomial variance alpha (1 - alpha) / m.
    """
    standard_error = math.sqrt(alpha * (1 - alpha) * (1 / n + 1 / m))
    return 1 - alpha - 3 * standard_error, 1 - alpha + 1 / (n + 1) + 3 * standard_error


@pytest.mark.parametrize("name", ["mve", "quantile"])
def test_conformal_reaches_nominal_coverage_on_toy_data(toy, name):
    dm, methods = toy
    method = methods[name]
    conformal = ConformalRegression(method, alpha=ALPHA).calibrate(dm)
    assert conformal.score == ("cqr" if name == "quantile" else "normalized")
    assert int(conformal.num_calibration_points) == N_CALIB
    preds = conformal.predict_step(dm.X_test)
    y = dm.Y_test
    coverage = ((y >= preds["lower"]) & (y <= preds["upper"])).float().mean().item()
    low, high = coverage_band(N_CALIB, N_TEST, ALPHA)
    assert low <= coverage <= high, (coverage, low, high)

    # the scores and the quantile by hand (numpy)
    base = method.predict_step(dm.X_calib)
    y_cal = dm.Y_calib
    if name == "quantile":
        scores = torch.maximum(base["lower"] - y_cal, y_cal - base["upper"])
    else:
        scores = (y_cal - base["pred"]).abs() / base["pred_uct"]
    k = math.ceil((N_CALIB + 1) * (1 - ALPHA))
    expected = np.sort(scores.numpy()[:, 0])[k - 1]
    assert conformal.conformal_quantile.item() == pytest.approx(float(expected), rel=1e-6)

    # the interval and its Gaussian-equivalent std
    raw = method.predict_step(dm.X_test)
    q, z = conformal.conformal_quantile, conformal.z
    assert z == pytest.approx(1.6448536, rel=1e-6)
    if name == "quantile":
        torch.testing.assert_close(preds["lower"], raw["lower"] - q)
        torch.testing.assert_close(preds["upper"], raw["upper"] + q)
        torch.testing.assert_close(preds["quantiles"], raw["quantiles"])  # kept, uncalibrated
    else:
        torch.testing.assert_close(preds["lower"], raw["pred"] - q * raw["pred_uct"])
        torch.testing.assert_close(preds["upper"], raw["pred"] + q * raw["pred_uct"])
    torch.testing.assert_close(preds["pred"], raw["pred"])
    torch.testing.assert_close(preds["pred_uct"], (preds["upper"] - preds["lower"]) / (2 * z))
    factor = preds["pred_uct"] / raw["pred_uct"]
    torch.testing.assert_close(preds["aleatoric_uct"], raw["aleatoric_uct"] * factor)
    assert (preds["epistemic_uct"] == 0).all()
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
    )

    # Lightning: the usual test metrics plus the conformal interval's coverage and width
    metrics = quiet_trainer().test(conformal, dm, verbose=False)[0]
    assert {
        "test_nll",
        "test_nll_gaussian",
        "test_rmse",
        "test_crps",
        "test_coverage_95",
        "test_miscalibration_area",
        "test_coverage",
        "test_interval_width",
    } == set(metrics)
    assert metrics["test_coverage"] == pytest.approx(coverage, abs=1e-6)
    width = (preds["upper"] - preds["lower"]).mean().item()
    assert metrics["test_interval_width"] == pytest.approx(width, rel=1e-5)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_conformal_calibrates_through_lightning_validation(toy):
    dm, methods = toy
    direct = ConformalRegression(methods["mve"]).calibrate(dm)
    through = ConformalRegression(methods["mve"])
    (logged,) = quiet_trainer().validate(through, dataloaders=dm.calib_dataloader(), verbose=False)
    torch.testing.assert_close(through.conformal_quantile, direct.conformal_quantile)
    assert logged["calibration_points"] == N_CALIB
    assert logged["conformal_quantile"] == pytest.approx(direct.conformal_quantile.item())
    # another split by name; and the state travels with the state dict
    on_val = ConformalRegression(methods["mve"]).calibrate(dm, split="val")
    assert int(on_val.num_calibration_points) == len(dm.X_val)
    restored = ConformalRegression(methods["mve"])
    restored.load_state_dict(direct.state_dict())
    torch.testing.assert_close(restored.conformal_quantile, direct.conformal_quantile)
    x = dm.X_test[:10]
    torch.testing.assert_close(restored.predict_step(x)["upper"], direct.predict_step(x)["upper"])


def test_conformal_scales_both_parts_of_the_uncertainty():
    """An ensemble-like method with epistemic > 0: both parts scale by one factor."""

    class TwoMembers(nn.Module):
        def forward(self, x):
            return torch.stack([torch.cat([x, x], -1), torch.cat([-x, x], -1)])

    class Method(MVERegression):
        num_mc_samples_test = 2

        def sample_outputs(self, x, num_samples):
            return self.model(x)

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(300, 1, generator=generator) + 0.5
    y = 2 * torch.randn(300, 1, generator=generator)
    conformal = ConformalRegression(Method(TwoMembers()), alpha=0.2).calibrate((x, y))
    raw, preds = conformal.model.predict_step(x), conformal.predict_step(x)
    assert (raw["epistemic_uct"] > 0).all()
    factor = conformal.conformal_quantile / conformal.z
    torch.testing.assert_close(preds["pred_uct"], raw["pred_uct"] * factor)
    torch.testing.assert_close(preds["epistemic_uct"], raw["epistemic_uct"] * factor)
    torch.testing.assert_close(preds["aleatoric_uct"], raw["aleatoric_uct"] * factor)
    torch.testing.assert_close(preds["samples"], raw["samples"])


def test_conformal_errors(toy):
    dm, methods = toy
    mve = methods["mve"]
    for bad in (0, 1, -0.1, 1.5, True, "0.1", math.nan):
        with pytest.raises(ValueError, match="`alpha`"):
            ConformalRegression(mve, alpha=bad)
    with pytest.raises(ValueError, match="`score`"):
        ConformalRegression(mve, score="quantile")
    with pytest.raises(TypeError, match="`model`.*regression"):
        ConformalRegression(DeterministicClassification(nn.Linear(2, 3)))
    with pytest.raises(TypeError, match="`model`"):
        ConformalRegression(nn.Linear(1, 2))

    conformal = ConformalRegression(mve)
    # predict or test before calibrating
    with pytest.raises(RuntimeError, match="not calibrated.*calibrate"):
        conformal.predict_step(dm.X_test)
    with pytest.raises(RuntimeError, match="not calibrated"):
        quiet_trainer().test(conformal, dm, verbose=False)
    # fitting a post-hoc wrapper
    with pytest.raises(RuntimeError, match="nothing to train"):
        quiet_trainer(max_epochs=1).fit(conformal, dm)
    # a data module without the calibration split: names it and lists the ones there are
    plain = ToyHeteroscedasticDatamodule(n_points=50, n_test=20)
    with pytest.raises(ValueError, match=r"no 'calib' split; it has \['train', 'val', 'test'\]"):
        conformal.calibrate(plain)
    with pytest.raises(TypeError, match="`data`"):
        conformal.calibrate(object())
    with pytest.raises(ValueError, match="`score`='cqr'"):
        ConformalRegression(mve, score="cqr").calibrate(dm)
    no_noise = DeterministicRegression(nn.Linear(1, 1))
    no_noise.noise_std.zero_()  # pred_uct = 0
    with pytest.raises(ValueError, match="pred_uct <= 0.*'absolute'"):
        ConformalRegression(no_noise).calibrate((torch.zeros(20, 1), torch.zeros(20, 1)))
    ConformalRegression(no_noise, score="absolute").calibrate((torch.zeros(20, 1), torch.ones(20)))
    # too few calibration points for alpha: infinite intervals, with a warning
    with pytest.warns(UserWarning, match="too few"):
        conformal.calibrate((dm.X_calib[:8], dm.Y_calib[:8]))
    preds = conformal.predict_step(dm.X_test[:5])
    assert (preds["upper"] == math.inf).all() and (preds["lower"] == -math.inf).all()
    assert (preds["pred_uct"] == math.inf).all() and not preds["epistemic_uct"].isnan().any()


# -- 4. temperature scaling ------------------------------------------------------------------------
TRUE_TEMPERATURE = 5.0


@pytest.fixture(scope="module")
def overconfident():
    """A multinomial logistic model whose logits are 5x the true ones."""
    generator = torch.Generator().manual_seed(0)
    d, c = 5, 4
    weight = 0.8 * torch.randn(c, d, generator=generator)

    def sample(n):
        x = torch.randn(n, d, generator=generator)
        y = torch.multinomial((x @ weight.T).softmax(-1), 1, generator=generator)[:, 0]
        return x, y

    dm = ArrayDataModule(*sample(50), *sample(3000), *sample(5000))
    network = nn.Linear(d, c, bias=False)
    with torch.no_grad():
        network.weight.copy_(TRUE_TEMPERATURE * weight)
    return dm, DeterministicClassification(network)


def nll_by_hand(logits, target):
    probs = classification_predictive(logits)["pred"]
    return -probs[torch.arange(len(target)), target].log().mean().item()


def grid_minimum(logits, target):
    """Brute force: a coarse log-spaced grid on [0.3, 30], then a fine one (spacing 0.05%)."""

    def search(grid):
        values = torch.tensor([nll_by_hand(logits / t, target) for t in grid.tolist()])
        return grid[values.argmin()].item(), values.min().item()

    coarse, _ = search(torch.exp(torch.linspace(math.log(0.3), math.log(30.0), 101)))
    return search(coarse * torch.exp(torch.linspace(-0.1, 0.1, 401, dtype=torch.float64)))


def test_temperature_scaling_recovers_the_temperature(overconfident):
    dm, classifier = overconfident
    scaling = TemperatureScaling(classifier).calibrate(dm)  # the val split
    temperature = scaling.temperature.item()
    assert temperature == pytest.approx(TRUE_TEMPERATURE, rel=0.1)
    # the grid-search minimum of the NLL on the validation logits
    logits = classifier.predict_step(dm.X_val)["logits"].double()
    best, best_nll = grid_minimum(logits, dm.Y_val)
    assert temperature == pytest.approx(best, rel=1e-3)
    assert nll_by_hand(logits / temperature, dm.Y_val) <= best_nll + 1e-9
    assert tempered_nll(logits, dm.Y_val, temperature).item() == pytest.approx(best_nll, abs=1e-6)

    # held-out data: NLL and ECE drop, accuracy unchanged (one sample: argmax unchanged)
    before = quiet_trainer().test(classifier, dm, verbose=False)[0]
    after = quiet_trainer().test(scaling, dm, verbose=False)[0]
    assert after["test_nll"] < before["test_nll"] - 0.2, (before, after)
    assert after["test_ece"] < 0.5 * before["test_ece"], (before, after)
    assert after["test_ece"] < 0.03, after
    assert after["test_accuracy"] == before["test_accuracy"]
    raw, scaled = classifier.predict_step(dm.X_test), scaling.predict_step(dm.X_test)
    assert torch.equal(raw["pred"].argmax(-1), scaled["pred"].argmax(-1))
    torch.testing.assert_close(scaled["logits"], raw["logits"] / temperature)
    ece = expected_calibration_error(scaled["pred"], dm.Y_test)
    assert ece.item() == pytest.approx(after["test_ece"], abs=1e-6)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert scaled[key].shape == (5000,)
    assert (scaled["pred_uct"] > raw["pred_uct"]).all()  # softer


def test_temperature_scaling_of_several_samples_matches_grid(overconfident):
    """With S members the NLL is that of the mean of the tempered softmaxes."""
    dm, classifier = overconfident
    generator = torch.Generator().manual_seed(1)
    members = []
    for _ in range(3):
        member = nn.Linear(5, 4, bias=False)
        with torch.no_grad():
            noise = 1.5 * torch.randn(4, 5, generator=generator)
            member.weight.copy_(classifier.model.weight + noise)
        members.append(member)
    ensemble = DeepEnsembleClassification(members, num_members=None)
    scaling = TemperatureScaling(ensemble).calibrate(dm)
    logits = ensemble.predict_step(dm.X_val)["logits"].double()
    assert logits.shape == (3, 3000, 4)
    best, _ = grid_minimum(logits, dm.Y_val)
    assert scaling.temperature.item() == pytest.approx(best, rel=1e-3)
    # not the temperature of the members' mean logits
    mean_logits_best, _ = grid_minimum(logits.mean(0, keepdim=True), dm.Y_val)
    assert abs(mean_logits_best - best) > 0.05


def test_temperature_scaling_through_lightning_validation(overconfident):
    dm, classifier = overconfident
    direct = TemperatureScaling(classifier).calibrate(dm)
    through = TemperatureScaling(classifier)
    (logged,) = quiet_trainer().validate(through, datamodule=dm, verbose=False)
    assert through.temperature.item() == pytest.approx(direct.temperature.item(), rel=1e-6)
    assert logged["temperature"] == pytest.approx(direct.temperature.item(), rel=1e-6)


def test_temperature_scaling_errors(overconfident):
    dm, classifier = overconfident
    with pytest.raises(TypeError, match="`model`.*classification"):
        TemperatureScaling(MVERegression(MLP(1, [4], 2)))
    with pytest.raises(ValueError, match="`max_iter`"):
        TemperatureScaling(classifier, max_iter=0)
    scaling = TemperatureScaling(classifier)
    with pytest.raises(RuntimeError, match="not calibrated.*'val'"):
        scaling.predict_step(dm.X_test)
    with pytest.raises(RuntimeError, match="nothing to train"):
        quiet_trainer(max_epochs=1).fit(scaling, dm)
    no_val = ArrayDataModule(dm.X_train, dm.Y_train, X_test=dm.X_test, y_test=dm.Y_test)
    with pytest.raises(ValueError, match=r"no 'val' split; it has \['train', 'test'\]"):
        scaling.calibrate(no_val)
    with pytest.raises(ValueError, match="integer class indices"):
        scaling.calibrate((dm.X_val, dm.Y_val.float()))
    # a calibration set classified without error drives T towards 0: a warning
    x = torch.randn(40, 5)
    y = classifier.predict_step(x)["pred"].argmax(-1)
    with pytest.warns(UserWarning, match="classified correctly"):
        scaling.calibrate((x, y))
    assert scaling.temperature.item() < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaling.calibrate(dm)
