"""NUTSReference by numbers.

- Bayesian linear regression with a known noise (3 parameters): the NUTS samples' mean and std
  match the closed-form posterior within Monte Carlo error, r_hat < 1.05, n_eff large, no
  divergences; the summary table has NumPyro's columns; a learned noise is found;
- a tiny BNN (MLP 1-10-1, 20 points, 2 chains, few draws) gives the prediction contract, and its
  vectorized prediction equals a loop over the samples;
- seeds: the same seed gives the same chains, the global RNG is left alone;
- mcmc_summary on chains that agree and that do not; clear errors;
- slow: a BNN on data with a gap mixes in function space and is most uncertain in the gap.
"""

import importlib
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from uq_box.models import MLP
from uq_box.reference import NUTSReference, mcmc_summary, parameter_names

COLUMNS = ["mean", "std", "median", "5.0%", "95.0%", "n_eff", "r_hat"]


def pyro_importable() -> bool:
    try:
        importlib.import_module("pyro")
    except ImportError:
        return False
    return True


needs_pyro = pytest.mark.skipif(not pyro_importable(), reason="needs the pyro extra")


def test_construction_needs_the_pyro_extra():
    if pyro_importable():
        ref = NUTSReference(nn.Linear(2, 1))
        assert ref.num_parameters == 3 and ref.samples is None
    else:
        with pytest.raises(ImportError, match=r"uq_box\[pyro\]"):
            NUTSReference(nn.Linear(2, 1))


def linear_data(n=30, noise=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen)
    y = x @ torch.tensor([[1.0], [-0.5]]) + 0.3 + noise * torch.randn(n, 1, generator=gen)
    return x, y


def closed_form_posterior(x, y, noise, prior_scale):
    """Posterior N(mu, Sigma) of [w1, w2, b] (nn.Linear's flat order: weight then bias)."""
    phi = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    precision = phi.T @ phi / noise**2 + torch.eye(3, dtype=torch.float64) / prior_scale**2
    cov = torch.linalg.inv(precision)
    return (cov @ phi.T @ y.double() / noise**2).ravel(), cov


@needs_pyro
def test_bayesian_linear_regression_matches_the_closed_form_posterior():
    noise, prior_scale = 0.5, 1.0
    x, y = linear_data(noise=noise)
    ref = NUTSReference(
        nn.Linear(2, 1),
        prior_scale=prior_scale,
        noise=noise,
        num_chains=4,
        num_warmup=150,
        num_samples=300,
        seed=1,
    ).fit(x, y)
    assert ref.samples.shape == (4, 300, 3)
    assert ref.samples.dtype == torch.float64
    assert ref.noise_samples is None

    table = ref.summary()
    assert list(table.columns) == COLUMNS
    assert list(table.index) == ["weight[0,0]", "weight[0,1]", "bias[0]"]
    assert table.attrs["num_divergences"] == 0 == ref.num_divergences
    assert (table["r_hat"] < 1.05).all(), table
    assert (table["n_eff"] > 300).all(), table

    mu, cov = closed_form_posterior(x, y, noise, prior_scale)
    std = cov.diag().sqrt()
    n_eff = torch.tensor(table["n_eff"].to_numpy())
    mean_se = std / n_eff.sqrt()
    std_se = std / (2 * n_eff).sqrt()  # std error of a Gaussian's sample std
    assert ((torch.tensor(table["mean"].to_numpy()) - mu).abs() < 4 * mean_se).all(), (table, mu)
    assert ((torch.tensor(table["std"].to_numpy()) - std).abs() < 4 * std_se).all(), (table, std)
    flat = ref.samples.reshape(-1, 3)
    sample_corr = torch.corrcoef(flat.T)
    true_corr = cov / torch.outer(std, std)
    assert (sample_corr - true_corr).abs().max() < 0.1

    # predictive: epistemic = std of the linear function, aleatoric = the noise
    x_new = torch.tensor([[0.5, -1.0], [3.0, 3.0]])
    preds = ref.predict(x_new)
    phi_new = torch.cat([x_new, torch.ones(2, 1)], 1).double()
    f_std = (phi_new @ cov @ phi_new.T).diag().sqrt()
    assert preds["pred"].dtype == torch.float32
    torch.testing.assert_close(preds["aleatoric_uct"], torch.full((2, 1), noise))
    torch.testing.assert_close(preds["epistemic_uct"].double().ravel(), f_std, rtol=0.1, atol=0.0)
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["epistemic_uct"] ** 2 + preds["aleatoric_uct"] ** 2
    )
    assert ref.chain_diagnostics[0].keys() >= {
        "divergences",
        "accept_prob",
        "step_size",
        "grad_evals_per_iteration",
    }
    assert 0.5 < ref.chain_diagnostics[0]["accept_prob"] <= 1.0


@needs_pyro
def test_learned_noise_is_sampled_and_summarized():
    x, y = linear_data(n=60, noise=0.3, seed=2)
    ref = NUTSReference(
        nn.Linear(2, 1), noise="learned", num_chains=2, num_warmup=150, num_samples=200
    ).fit(x, y)
    assert ref.noise_samples.shape == (2, 200)
    table = ref.summary()
    assert table.index[-1] == "noise_std"
    assert table.loc["noise_std", "r_hat"] < 1.05
    assert 0.2 < table.loc["noise_std", "mean"] < 0.4
    preds = ref.predict(x[:4])
    expected = ref.noise_samples.pow(2).mean().sqrt().float()
    torch.testing.assert_close(preds["aleatoric_uct"], expected.expand(4, 1))


def tiny_bnn_data(n=20):
    gen = torch.Generator().manual_seed(3)
    x = torch.cat(
        [torch.rand(n // 2, 1, generator=gen) - 1.5, torch.rand(n // 2, 1, generator=gen) + 0.5]
    )
    return x, torch.sin(2 * x) + 0.1 * torch.randn(n, 1, generator=gen)


def tiny_reference(seed=0):
    torch.manual_seed(0)
    net = MLP(1, [10], 1, activation_fn=nn.Tanh())
    return NUTSReference(
        net, noise=0.1, num_chains=2, num_warmup=20, num_samples=10, max_tree_depth=5, seed=seed
    )


@needs_pyro
def test_tiny_bnn_gives_the_prediction_contract():
    x, y = tiny_bnn_data()
    ref = tiny_reference()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    ref.fit(x, y)
    assert torch.rand(1) == before  # the global RNG is left as it was
    assert ref.samples.shape == (2, 10, 31)
    assert len(ref.chain_diagnostics) == 2

    grid = torch.linspace(-2, 2, 7).unsqueeze(-1)
    preds = ref.predict(grid)
    for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
        assert preds[key].shape == (7, 1), key
        assert torch.isfinite(preds[key]).all()
    assert preds["samples"].shape == (20, 7, 1)
    assert ref.predict(grid, num_samples=5)["samples"].shape == (5, 7, 1)
    assert ref.predict_step({"input": grid})["pred"].shape == (7, 1)

    # one vectorized call equals a loop over the samples
    flat = ref.samples.reshape(20, -1)
    looped = torch.stack(
        [functional_call(ref.model, ref.unflatten(theta), (grid.double(),)) for theta in flat]
    )
    torch.testing.assert_close(preds["samples"], looped.float())
    torch.testing.assert_close(preds["pred"], looped.mean(0).float())

    table = ref.summary()
    assert list(table.columns) == COLUMNS and len(table) == 31
    assert table.index[0] == "model.0.weight[0,0]"
    fsum = ref.prediction_summary(grid[:3])
    assert list(fsum.index) == ["f[0]", "f[1]", "f[2]"]

    again = tiny_reference().fit(x, y)
    torch.testing.assert_close(again.samples, ref.samples)
    other = tiny_reference(seed=5).fit(x, y)
    assert not torch.equal(other.samples, ref.samples)


@needs_pyro
def test_mcmc_summary_flags_chains_that_disagree():
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randn(4, 500, 2, generator=gen, dtype=torch.float64)
    table = mcmc_summary(mixed, names=["a", "b"])
    assert list(table.columns) == COLUMNS
    assert (table["r_hat"] < 1.02).all()
    assert (table["n_eff"] > 1000).all()
    stuck = mixed + torch.arange(4.0, dtype=torch.float64).view(4, 1, 1)
    assert (mcmc_summary(stuck)["r_hat"] > 1.5).all()
    assert list(mcmc_summary(mixed[..., 0]).index) == ["x[0]"]
    with pytest.raises(ValueError, match=r"\[chains, draws, K\]"):
        mcmc_summary(mixed[0, :, 0])


def test_parameter_names_flatten_row_major():
    names = parameter_names([("w", (2, 2)), ("b", (1,)), ("s", ())])
    assert names == ["w[0,0]", "w[0,1]", "w[1,0]", "w[1,1]", "b[0]", "s"]


@needs_pyro
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"noise": "fixed"}, ValueError, "`noise` must be 'learned' or a positive number"),
        ({"noise": -1.0}, ValueError, "`noise` must be a positive finite number"),
        ({"prior_scale": 0.0}, ValueError, "`prior_scale` must be a positive finite number"),
        ({"num_chains": 0}, ValueError, "`num_chains` must be a positive integer"),
        (
            {"target_accept_prob": 1.0},
            ValueError,
            r"`target_accept_prob` must be a number in \(0, 1\)",
        ),
        ({"init": "zeros"}, ValueError, "`init` must be one of"),
    ],
)
def test_arguments_are_checked(kwargs, error, match):
    with pytest.raises(error, match=match):
        NUTSReference(nn.Linear(1, 1), **kwargs)


@needs_pyro
def test_data_errors_are_clear():
    x, y = linear_data()
    ref = NUTSReference(MLP(2, [4], 2), noise=0.1)
    with pytest.raises(ValueError, match="set the network's `n_outputs` to 1"):
        ref.fit(x, y)
    ref = NUTSReference(nn.Linear(2, 1), noise=0.1)
    with pytest.raises(RuntimeError, match="call `fit"):
        ref.predict(x)
    bad = y.clone()
    bad[3] = math.nan
    with pytest.raises(ValueError, match="`y` contains non-finite"):
        ref.fit(x, bad)
    with pytest.raises(ValueError, match="`X` has 30 points but `y` has 29"):
        ref.fit(x, y[:29])
    with pytest.raises(ValueError, match=r"`init` must have shape \[4, 3\] or \[3\]"):
        NUTSReference(nn.Linear(2, 1), noise=0.1, init=torch.zeros(2, 3)).fit(x, y)


@needs_pyro
@pytest.mark.slow
def test_bnn_on_gap_data_mixes_in_function_space_and_is_unsure_in_the_gap():
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-1.0, -0.3, 20), torch.linspace(0.3, 1.0, 20)]).unsqueeze(-1)
    y = torch.sin(3 * x) + 0.1 * torch.randn(40, 1, generator=gen)
    torch.manual_seed(0)
    ref = NUTSReference(
        MLP(1, [10], 1, activation_fn=nn.Tanh()),
        noise=0.1,
        num_chains=4,
        num_warmup=200,
        num_samples=200,
        max_tree_depth=8,
        target_accept_prob=0.9,
    ).fit(x, y)
    grid = torch.linspace(-1.0, 1.0, 21).unsqueeze(-1)
    assert (ref.prediction_summary(grid)["r_hat"] < 1.1).all()
    preds = ref.predict(grid)
    in_gap = grid.abs().ravel() < 0.2
    assert preds["epistemic_uct"][in_gap].mean() > 2 * preds["epistemic_uct"][~in_gap].mean()
