"""Bayes by Backprop and MC dropout on every backbone of the zoo: fit, predict, the contract.

The sampled forward itself is checked against a loop in tests/nn/test_nn_backbones.py; here the
methods train through ``lightning.Trainer`` and predict with ``predict_step``.
"""

import warnings

import pytest
import torch
from backbones import BACKBONES, with_dropout
from helpers import quiet_trainer
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import (
    BNNVIClassification,
    BNNVIRegression,
    MCDropoutClassification,
    MCDropoutRegression,
)

N_CLASSES, N_POINTS, NUM_SAMPLES = 3, 16, 3


def _data(entry, regression):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((N_POINTS, *entry.input_shape), generator=gen)
    y = torch.randn(N_POINTS, 1, generator=gen) if regression else torch.arange(N_POINTS) % 3
    return x, ArrayDataModule(x, y, x[:8], y[:8], batch_size=8)


def _check(preds, regression):
    n = 8
    if regression:
        for key in ("pred", "pred_uct", "epistemic_uct", "aleatoric_uct"):
            assert preds[key].shape == (n, 1), key
        assert preds["samples"].shape == (NUM_SAMPLES, n, 1)
        torch.testing.assert_close(
            preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
        )
    else:
        assert preds["pred"].shape == (n, N_CLASSES)
        torch.testing.assert_close(preds["pred"].sum(-1), torch.ones(n))
        for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
            assert preds[key].shape == (n,), key
        assert preds["logits"].shape == (NUM_SAMPLES, n, N_CLASSES)
    assert all(torch.isfinite(v).all() for v in preds.values())
    assert (preds["epistemic_uct"] > 0).any()  # the samples differ


def _fit_and_predict(model, entry, regression):
    x, dm = _data(entry, regression)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the graph is traced
        warnings.filterwarnings("ignore", message=".*(workers|logging interval|GPU).*")
        quiet_trainer(max_epochs=2, accelerator="cpu").fit(model, dm)
    preds = model.predict_step(x[:8])
    _check(preds, regression)


# classification on every backbone, regression on three; both placements that reach inside
CASES = [(name, "inner", False) for name in BACKBONES] + [
    (name, "all", name in ("mlp", "unet", "transformer")) for name in BACKBONES
]


@pytest.mark.parametrize(("backbone", "placement", "regression"), CASES)
def test_bnn_vi_on_backbone(backbone, placement, regression):
    entry = BACKBONES[backbone]
    torch.manual_seed(0)
    method = BNNVIRegression if regression else BNNVIClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # None: unsupported layers stay deterministic
        model = method(
            entry.build(2 if regression else N_CLASSES),
            stochastic_module_names=entry.placements[placement],
            posterior_rho_init=-3.0,
            num_mc_samples_train=2,
            num_mc_samples_test=NUM_SAMPLES,
        )
    _fit_and_predict(model, entry, regression)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_mc_dropout_on_backbone(backbone):
    entry = BACKBONES[backbone]
    torch.manual_seed(0)
    regression = backbone in ("residual", "shared")
    network = entry.build(2 if regression else N_CLASSES)
    (inner,) = entry.placements["inner"]
    if inner.startswith("enc."):  # the transformer block's own dropout layers
        for module in network.enc.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.3
    else:
        with_dropout(network, inner)
    method = MCDropoutRegression if regression else MCDropoutClassification
    model = method(network, num_mc_samples_train=2, num_mc_samples_test=NUM_SAMPLES)
    _fit_and_predict(model, entry, regression)
