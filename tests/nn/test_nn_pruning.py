"""Pruning by signal-to-noise ratio (Blundell et al. 2015) against random pruning."""

import copy
from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn

from uq_box.datamodules import DigitsDatamodule
from uq_box.methods import BNNVIClassification
from uq_box.nn import (
    BayesianConv2d,
    BayesianLinear,
    prune_by_snr,
    prune_random,
    pruning_curve,
    sample_forward,
    snr,
    to_bayesian,
)
from uq_box.nn.pruning import PRUNED_RHO


@pytest.fixture(scope="module")
def trained_digits_bnn():
    """An all-Bayesian MLP 64-100-10 trained briefly on the 8x8 digits (about 1 s)."""
    seed_everything(0)
    dm = DigitsDatamodule(flatten=True, val_fraction=0.0, batch_size=64)
    method = BNNVIClassification(
        nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10)),
        optimizer=partial(torch.optim.Adam, lr=0.01),
        stochastic_module_names=None,
        posterior_rho_init=-3.0,
        estimator="local",
        num_mc_samples_train=4,
    )
    quiet_trainer(max_epochs=10, limit_val_batches=0).fit(method, dm)
    return method.model, dm.X_test, dm.Y_test


def _accuracy(x, y):
    def evaluate(net):
        torch.manual_seed(0)
        with torch.no_grad():
            probs = sample_forward(net, x, 16).softmax(-1).mean(0)
        return (probs.argmax(-1) == y).float().mean().item()

    return evaluate


def test_pruning_half_by_snr_loses_less_than_random(trained_digits_bnn):
    net, x, y = trained_digits_bnn
    accuracy = _accuracy(x, y)
    before = accuracy(net)
    assert before > 0.85
    by_snr = pruning_curve(net, [0.5], accuracy)[0]
    at_random = [
        pruning_curve(net, [0.5], accuracy, "random", torch.Generator().manual_seed(seed))[0]
        for seed in range(3)
    ]
    random_mean = sum(at_random) / len(at_random)
    assert before - by_snr < 0.03, (before, by_snr)
    assert before - random_mean > (before - by_snr) + 0.05, (before, by_snr, at_random)
    # the network itself was left alone
    assert accuracy(net) == before
    # and SNR keeps the lead as more is pruned
    curve_snr = pruning_curve(net, [0.75, 0.9], accuracy)
    curve_random = pruning_curve(net, [0.75, 0.9], accuracy, "random", torch.Generator())
    assert all(s > r for s, r in zip(curve_snr, curve_random, strict=True))


def test_prune_by_snr_prunes_the_lowest_snr_globally(trained_digits_bnn):
    net = copy.deepcopy(trained_digits_bnn[0])
    ratios = snr(net)
    assert list(ratios) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(ratios["0.weight"], net[0].weight_mu.abs() / net[0].weight_sigma)
    assert list(snr(net, include_bias=False)) == ["0.weight", "2.weight"]
    total = sum(r.numel() for r in ratios.values())
    masks = prune_by_snr(net, 0.6)
    assert list(masks) == list(ratios)
    pruned = sum((~m).sum().item() for m in masks.values())
    assert pruned == round(0.6 * total)
    kept_min = min(ratios[k][m].min() for k, m in masks.items() if m.any())
    pruned_max = max(ratios[k][~m].max() for k, m in masks.items() if (~m).any())
    assert pruned_max <= kept_min  # one threshold across layers
    # layers lose different shares: the threshold is global, not per layer
    shares = [(~masks[k]).float().mean().item() for k in ("0.weight", "2.weight")]
    assert abs(shares[0] - shares[1]) > 0.02
    for key, mask in masks.items():
        layer, kind = net[int(key[0])], key.split(".")[1]
        mu, sigma = getattr(layer, f"{kind}_mu"), getattr(layer, f"{kind}_sigma")
        assert (mu[~mask] == 0).all() and (sigma[~mask] < 1e-12).all()
        assert (getattr(layer, f"{kind}_rho")[~mask] == PRUNED_RHO).all()
        original = trained_digits_bnn[0][int(key[0])]
        torch.testing.assert_close(mu[mask], getattr(original, f"{kind}_mu")[mask])


def test_prune_random_count_and_reproducibility():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    net = to_bayesian(net, None, posterior_rho_init=-2.0)
    assert isinstance(net[0], BayesianConv2d) and isinstance(net[2], BayesianLinear)
    total = sum(r.numel() for r in snr(net, include_bias=False).values())
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    masks_a = prune_random(a, 0.3, torch.Generator().manual_seed(1), include_bias=False)
    masks_b = prune_random(b, 0.3, torch.Generator().manual_seed(1), include_bias=False)
    assert sum((~m).sum().item() for m in masks_a.values()) == round(0.3 * total)
    assert all(torch.equal(masks_a[k], masks_b[k]) for k in masks_a)
    assert torch.equal(a[0].bias_mu, net[0].bias_mu)  # biases untouched
    other = prune_random(copy.deepcopy(net), 0.3, torch.Generator().manual_seed(2), False)
    assert not all(torch.equal(masks_a[k], other[k]) for k in masks_a)


def test_prune_everything_or_nothing_and_errors():
    layer = BayesianLinear(4, 3, posterior_rho_init=-2.0)
    before = copy.deepcopy(layer.state_dict())
    masks = prune_by_snr(layer, 0.0)
    assert all(m.all() for m in masks.values())
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    prune_by_snr(layer, 1.0)
    out = sample_forward(layer, torch.randn(5, 4), 3)
    assert out.abs().max() < 1e-10  # all weights and biases are exactly 0 with ~0 spread
    with pytest.raises(ValueError, match="fraction"):
        prune_by_snr(layer, 1.5)
    with pytest.raises(ValueError, match="fraction"):
        prune_random(layer, -0.1)
    with pytest.raises(ValueError, match="no Bayesian layer"):
        snr(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no Bayesian layer"):
        prune_by_snr(nn.Sequential(nn.Linear(2, 2)), 0.5)
    with pytest.raises(ValueError, match="method"):
        pruning_curve(layer, [0.5], lambda m: 0.0, method="magnitude")
