"""Vectorized Monte Carlo forward passes checked against an independent per-sample loop."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.func import functional_call

from uq_box.nn import (
    BayesianConv2d,
    BayesianLinear,
    current_mc_state,
    mc_sampling,
    sample_forward,
    to_bayesian,
)
from uq_box.nn.layers import _BayesianLayer

DTYPE = torch.float64


def _bayesian_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BayesianLayer)]


def _convert(model, names, estimator="reparameterization", seed=0):
    """A float64 Bayesian copy of ``model`` with random, non-trivial ``rho``."""
    base = copy.deepcopy(model).to(DTYPE)
    bayes = to_bayesian(copy.deepcopy(base), names, estimator=estimator)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in _bayesian_layers(bayes):
            for p in (layer.weight_rho, layer.bias_rho):
                if p is not None:
                    p.copy_(torch.empty(p.shape, dtype=DTYPE).uniform_(-2.5, -0.5, generator=gen))
    return base, bayes


def _noise_table(bayes, num_samples, seed=1):
    """Pre-generated eps per (module, name), shape ``[S, *param_shape]``."""
    gen = torch.Generator().manual_seed(seed)
    table = {}
    for _, layer in _bayesian_layers(bayes):
        for name in ("weight", "bias"):
            mu = getattr(layer, f"{name}_mu")
            if mu is not None:
                table[(layer, name)] = torch.randn(
                    (num_samples, *mu.shape), generator=gen, dtype=DTYPE
                )
    calls = []

    def noise_fn(module, name, shape):
        calls.append((module, name, tuple(shape)))
        eps = table[(module, name)]
        assert tuple(shape) == tuple(eps.shape), (name, shape, eps.shape)
        return eps

    return table, noise_fn, calls


def _reference_loop(base, bayes, table, x, num_samples):
    """Per-sample loop: sampled weights plugged into the ORIGINAL deterministic network."""
    outs = []
    for s in range(num_samples):
        params = dict(base.named_parameters())
        for name, layer in _bayesian_layers(bayes):
            for kind in ("weight", "bias"):
                mu = getattr(layer, f"{kind}_mu")
                if mu is None:
                    continue
                rho = getattr(layer, f"{kind}_rho")
                params[f"{name}.{kind}"] = mu + F.softplus(rho) * table[(layer, kind)][s]
        # deterministic layers keep the parameters of the Bayesian model
        for pname, p in bayes.named_parameters():
            if pname in params:
                params[pname] = p
        outs.append(functional_call(base, params, (x,)))
    return torch.stack(outs)


def _check_against_loop(model, names, x, num_samples=5):
    base, bayes = _convert(model, names)
    table, noise_fn, calls = _noise_table(bayes, num_samples)
    out = sample_forward(bayes, x.to(DTYPE), num_samples, noise_fn=noise_fn)
    ref = _reference_loop(base, bayes, table, x.to(DTYPE), num_samples)
    assert out.shape == ref.shape == (num_samples, *base(x.to(DTYPE)).shape)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # the samples really differ from each other and from the mean network
    assert (out[0] - out[1]).abs().max() > 1e-3
    assert (out[0] - base(x.to(DTYPE))).abs().max() > 1e-3
    # every weight and bias noise was asked for exactly once
    assert sorted((id(m), n) for m, n, _ in calls) == sorted((id(m), n) for m, n in table)
    return base, bayes, table, out


def _mlp():
    return nn.Sequential(
        nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2)
    )


# ----------------------------------------------------------------------------- against the loop


@pytest.mark.parametrize("names", [[-1], None, [0], [1], [0, -1]], ids=str)
def test_mlp_matches_per_sample_loop(names):
    torch.manual_seed(0)
    _check_against_loop(_mlp(), names, torch.randn(7, 3))


def test_mlp_without_bias_matches_per_sample_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False), nn.ReLU(),
        nn.Linear(4, 2),
    )  # fmt: skip
    _check_against_loop(model, None, torch.randn(6, 3))


def _cnn(groups_first):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, groups=groups_first),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(6, 4, 3, padding=2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


@pytest.mark.parametrize("groups_first", [1, 2])
@pytest.mark.parametrize("names", [None, [-1], [1], [1, 2], [2, 3]], ids=str)
def test_cnn_matches_per_sample_loop(groups_first, names):
    torch.manual_seed(0)
    _check_against_loop(_cnn(groups_first), names, torch.randn(4, 2, 8, 8), num_samples=3)


def test_conv1d_matches_per_sample_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(4, 4, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.Conv1d(4, 2, 2, bias=False),
    )
    _check_against_loop(model, None, torch.randn(3, 2, 11), num_samples=4)
    _check_against_loop(model, [1], torch.randn(3, 2, 11), num_samples=4)


def test_conv3d_matches_per_sample_loop():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 2, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(2, 4, (1, 2, 2), stride=(1, 2, 2), groups=2),
    )
    _check_against_loop(model, None, torch.randn(2, 2, 3, 4, 4), num_samples=3)
    _check_against_loop(model, [-1], torch.randn(2, 2, 3, 4, 4), num_samples=3)


@pytest.mark.parametrize("names", [None, [-1], [0]], ids=str)
def test_extra_input_dims_through_linear_match_loop(names):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    _, _, _, out = _check_against_loop(model, names, torch.randn(5, 3, 4), num_samples=4)
    assert out.shape == (4, 5, 3, 2)


def test_gradients_match_the_loop():
    torch.manual_seed(0)
    base, bayes = _convert(_mlp(), [0, -1])
    num_samples = 4
    table, noise_fn, _ = _noise_table(bayes, num_samples)
    x, y = torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    params = [p for _, p in bayes.named_parameters()]

    loss = (sample_forward(bayes, x, num_samples, noise_fn=noise_fn) - y).pow(2).mean()
    grads = torch.autograd.grad(loss, params)
    ref_loss = (_reference_loop(base, bayes, table, x, num_samples) - y).pow(2).mean()
    ref_grads = torch.autograd.grad(ref_loss, params)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for (name, _), g, r in zip(bayes.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)
        if "_mu" in name or "_rho" in name:
            assert g.abs().sum() > 0, name


# ----------------------------------------------------------------------------- local estimator


def _output_noise(seed=2):
    gen = torch.Generator().manual_seed(seed)
    table = {}

    def noise_fn(module, name, shape):
        assert name == "output"
        if module not in table:
            table[module] = torch.randn(shape, generator=gen, dtype=DTYPE)
        return table[module]

    return table, noise_fn


def test_local_estimator_by_hand_single_layer():
    torch.manual_seed(0)
    layer = BayesianLinear(4, 3, estimator="local", posterior_rho_init=-1.0).to(DTYPE)
    with torch.no_grad():
        layer.weight_rho.uniform_(-2.0, 0.0)
    x = torch.randn(5, 4, dtype=DTYPE)
    table, noise_fn = _output_noise()
    out = sample_forward(layer, x, 6, noise_fn=noise_fn)
    eps = table[layer]
    assert eps.shape == (6, 5, 3)
    sigma_w, sigma_b = F.softplus(layer.weight_rho), F.softplus(layer.bias_rho)
    mean = x @ layer.weight_mu.T + layer.bias_mu
    var = (x**2) @ (sigma_w**2).T + sigma_b**2
    torch.testing.assert_close(out, mean + var.sqrt() * eps, rtol=1e-12, atol=1e-12)


def test_local_estimator_by_hand_two_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    base, bayes = _convert(model, None, estimator="local")
    x = torch.randn(4, 3, dtype=DTYPE)
    num_samples = 7
    table, noise_fn = _output_noise()
    out = sample_forward(bayes, x, num_samples, noise_fn=noise_fn)

    def local(layer, h, eps):
        mean = h @ layer.weight_mu.T + layer.bias_mu
        var = h**2 @ (F.softplus(layer.weight_rho) ** 2).T + F.softplus(layer.bias_rho) ** 2
        return mean + var.sqrt() * eps.reshape(mean.shape)

    h = local(bayes[0], x.expand(num_samples, 4, 3), table[bayes[0]].reshape(num_samples, 4, 5))
    ref = local(bayes[2], torch.relu(h), table[bayes[2]].reshape(num_samples, 4, 2))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_local_estimator_conv_by_hand():
    torch.manual_seed(0)
    layer = BayesianConv2d(2, 4, 3, padding=1, groups=2, estimator="local").to(DTYPE)
    with torch.no_grad():
        layer.weight_rho.uniform_(-2.0, 0.0)
        layer.bias_rho.fill_(-1.0)
    x = torch.randn(3, 2, 5, 5, dtype=DTYPE)
    table, noise_fn = _output_noise()
    out = sample_forward(layer, x, 4, noise_fn=noise_fn)
    mean = F.conv2d(x, layer.weight_mu, layer.bias_mu, padding=1, groups=2)
    var = F.conv2d(
        x**2, F.softplus(layer.weight_rho) ** 2, F.softplus(layer.bias_rho) ** 2, padding=1,
        groups=2,
    )  # fmt: skip
    ref = mean + var.sqrt() * table[layer].reshape(4, *mean.shape)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_local_and_reparameterization_agree_in_distribution():
    torch.manual_seed(0)
    rep = BayesianLinear(3, 2, posterior_rho_init=-1.0).to(DTYPE)
    with torch.no_grad():
        rep.weight_rho.uniform_(-1.5, 0.0)
        rep.weight_mu.normal_()
    loc = BayesianLinear(3, 2, estimator="local").to(DTYPE)
    loc.load_state_dict(rep.state_dict())
    x = torch.randn(5, 3, dtype=DTYPE)
    num_samples = 20_000
    mean = x @ rep.weight_mu.T + rep.bias_mu
    var = x**2 @ (F.softplus(rep.weight_rho) ** 2).T + F.softplus(rep.bias_rho) ** 2
    with torch.no_grad():
        for layer in (rep, loc):
            out = sample_forward(layer, x, num_samples)
            assert out.shape == (num_samples, 5, 2)
            se_mean = (var / num_samples).sqrt()
            se_var = var * math.sqrt(2.0 / num_samples)
            assert ((out.mean(0) - mean).abs() < 5 * se_mean).all(), layer.estimator
            assert ((out.var(0) - var).abs() < 5 * se_var).all(), layer.estimator


def test_local_estimator_extra_dims():
    torch.manual_seed(0)
    model = to_bayesian(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)), [-1],
                        estimator="local")  # fmt: skip
    out = sample_forward(model, torch.randn(5, 3, 4), 7)
    assert out.shape == (7, 5, 3, 2)


# ----------------------------------------------------------------------------- structure


def test_layers_before_first_bayesian_layer_run_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    to_bayesian(model, [1])  # the middle Linear, "2"
    seen = {}

    def hook(name):
        def fn(module, args, output):
            seen.setdefault(name, []).append((args[0].shape[0], output.shape[0]))

        return fn

    for name, module in model.named_children():
        module.register_forward_hook(hook(name))
    num_samples, n = 6, 5
    out = sample_forward(model, torch.randn(n, 3), num_samples)
    assert out.shape == (num_samples, n, 2)
    assert seen["0"] == [(n, n)]
    assert seen["1"] == [(n, n)]
    assert seen["2"] == [(n, num_samples * n)]  # the first Bayesian layer folds the samples
    assert seen["3"] == [(num_samples * n, num_samples * n)]
    assert seen["4"] == [(num_samples * n, num_samples * n)]
    assert current_mc_state() is None


def test_model_without_bayesian_layers_gives_identical_copies():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(4, 3)
    out = sample_forward(model, x, 5)
    assert out.shape == (5, 4, 2)
    for s in range(5):
        torch.testing.assert_close(out[s], model(x), rtol=0, atol=0)


def test_default_noise_gives_distinct_samples_and_uses_torch_seed():
    model = to_bayesian(_mlp(), None, posterior_rho_init=-1.0)
    x = torch.randn(4, 3)
    torch.manual_seed(3)
    a = sample_forward(model, x, 5)
    torch.manual_seed(3)
    b = sample_forward(model, x, 5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for s in range(1, 5):
        assert (a[0] - a[s]).abs().max() > 1e-3


def test_outside_mc_sampling_one_fresh_sample_per_call():
    torch.manual_seed(0)
    layer = BayesianLinear(3, 2, posterior_rho_init=-1.0)
    plain = nn.Linear(3, 2)
    for x in (torch.randn(4, 3), torch.randn(4, 6, 3)):
        first, second = layer(x), layer(x)
        assert first.shape == second.shape == plain(x).shape
        assert (first - second).abs().max() > 1e-3
    conv = BayesianConv2d(2, 4, 3, stride=2, padding=1, posterior_rho_init=-1.0)
    x = torch.randn(3, 2, 7, 7)
    assert conv(x).shape == nn.Conv2d(2, 4, 3, stride=2, padding=1)(x).shape
    assert (conv(x) - conv(x)).abs().max() > 1e-3
    local = BayesianLinear(3, 2, posterior_rho_init=-1.0, estimator="local")
    x = torch.randn(4, 3)
    assert local(x).shape == (4, 2) and (local(x) - local(x)).abs().max() > 1e-3


def test_outside_mc_sampling_matches_weight_distribution():
    torch.manual_seed(0)
    layer = BayesianLinear(2, 1, posterior_rho_init=-0.5).double()
    x = torch.tensor([[1.0, -2.0]], dtype=DTYPE)
    with torch.no_grad():
        outs = torch.cat([layer(x) for _ in range(4000)])
    mean = x @ layer.weight_mu.T + layer.bias_mu
    var = x**2 @ (F.softplus(layer.weight_rho) ** 2).T + F.softplus(layer.bias_rho) ** 2
    assert abs(outs.mean() - mean).item() < 5 * math.sqrt(var.item() / 4000)
    assert abs(outs.var() - var).item() < 5 * var.item() * math.sqrt(2 / 4000)


def test_noise_fn_with_wrong_shape_is_an_error():
    model = to_bayesian(_mlp(), [-1])
    with pytest.raises(ValueError, match="noise_fn"):
        sample_forward(model, torch.randn(4, 3), 3, noise_fn=lambda m, n, s: torch.zeros(2))
    assert current_mc_state() is None  # the context was reset


@pytest.mark.parametrize("bad", [0, -1, 2.0, None])
def test_bad_number_of_samples(bad):
    with pytest.raises(ValueError, match="num_samples"):
        with mc_sampling(bad):
            pass
    with pytest.raises(ValueError, match="num_samples"):
        sample_forward(_mlp(), torch.randn(2, 3), bad)


def test_single_sample_matches_loop():
    torch.manual_seed(0)
    _check_against_loop(_mlp(), None, torch.randn(3, 3), num_samples=2)
    base, bayes = _convert(_mlp(), None)
    table, noise_fn, _ = _noise_table(bayes, 1)
    out = sample_forward(bayes, torch.ones(3, 3, dtype=DTYPE), 1, noise_fn=noise_fn)
    ref = _reference_loop(base, bayes, table, torch.ones(3, 3, dtype=DTYPE), 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
