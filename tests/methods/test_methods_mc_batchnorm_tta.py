"""MC BatchNorm (Teye et al. 2018) and test-time augmentation (Ayhan & Berens 2018).

MC BatchNorm: the stored statistics are the training-mode batch statistics of the batches given;
the ``S`` sets as one batched forward equal a loop of ``S`` eval passes each with one set as the
running statistics (MLP and CNN); a fit stores them when training ends (epistemic part > 0,
validation before that uses the running statistics); a network without BatchNorm is refused.
TTA: a list of transforms gives one prediction each (= a loop), a random callable runs once on
the ``S`` stacked copies, a wrapped fitted method combines its samples with the augmentations,
and the bad inputs are refused with messages naming the argument.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning import Trainer, seed_everything
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import (
    MCBatchNormClassification,
    MCBatchNormRegression,
    MCDropoutClassification,
    TTAClassification,
    TTARegression,
)
from uq_box.methods.tta import Flip, GaussianNoise
from uq_box.models import MLP
from uq_box.nn import sample_forward
from uq_box.nn.mc_batchnorm import MCBatchNorm2d, collect_batch_statistics, mc_batchnorm_layers


def _quiet(**extra) -> Trainer:
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    )


def _loop_reference(network: nn.Module, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``S`` plain eval passes, each with stored set ``s`` as the running statistics."""
    layers = mc_batchnorm_layers(network)
    saved = [(m.running_mean.clone(), m.running_var.clone()) for m in layers]
    outputs = []
    for s in range(num_samples):
        for m in layers:
            m.running_mean.copy_(m.sample_mean[s])
            m.running_var.copy_(m.sample_var[s])
        outputs.append(network(x))
    for m, (mean, var) in zip(layers, saved, strict=True):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return torch.stack(outputs)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_mc_batchnorm_vectorized_equals_loop(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        network, x = MLP(3, [8, 8], 3, batch_norm=True), torch.randn(40, 3)
    else:
        network, x = _cnn(), torch.randn(40, 1, 5, 5)
    method = MCBatchNormClassification(network, num_mc_samples_test=4)
    batches = [x[8 * i : 8 * (i + 1)] for i in range(5)]
    method.collect_statistics(batches)
    if kind == "cnn":
        assert all(isinstance(m, MCBatchNorm2d) for m in mc_batchnorm_layers(network))
    # set 2 holds the training-mode statistics of batch 2 (biased variance)
    first = mc_batchnorm_layers(network)[0]
    features = network.model[0](batches[2]) if kind == "mlp" else network[0](batches[2])
    dims = [0] if kind == "mlp" else [0, 2, 3]
    torch.testing.assert_close(first.sample_mean[2], features.mean(dims))
    torch.testing.assert_close(first.sample_var[2], features.var(dims, unbiased=False))
    network.eval()
    with torch.no_grad():
        expected = _loop_reference(network, x[:6], 4)
        got = sample_forward(network, x[:6], 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    preds = method.predict_step(x[:6])
    torch.testing.assert_close(preds["logits"], expected, rtol=1e-5, atol=1e-6)
    assert (preds["epistemic_uct"] > 0).all()


def test_mc_batchnorm_fit_stores_statistics_when_training_ends():
    seed_everything(0)
    x = torch.randn(96, 2)
    y = torch.sin(2 * x[:, :1]) + 0.1 * torch.randn(96, 1)
    dm = ArrayDataModule(x[:64], y[:64], x[64:], y[64:], x[64:], y[64:], batch_size=16)
    method = MCBatchNormRegression(
        MLP(2, [16], 2, batch_norm=True),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        num_mc_samples_test=6,
    )
    assert not method.statistics_collected
    before = method.predict_step(x[64:])  # running statistics: one sample
    assert before["samples"].shape[0] == 1 and (before["epistemic_uct"] == 0).all()
    _quiet(max_epochs=3).fit(method, dm)
    assert method.statistics_collected
    layer = mc_batchnorm_layers(method.model)[0]
    assert int(layer.num_collected) == 6
    sets = layer.sample_mean
    assert not torch.allclose(sets[0], sets[1])  # different mini-batches
    preds = method.predict_step(x[64:])
    assert preds["samples"].shape == (6, 32, 1)
    assert (preds["epistemic_uct"] > 0).all()
    metrics = _quiet().test(method, dm, verbose=False)[0]
    assert torch.isfinite(torch.tensor(metrics["test_nll"]))
    # a new fit starts without the old statistics and stores new ones at its end
    method.on_fit_begin()
    assert not method.statistics_collected


def test_mc_batchnorm_refuses_a_network_without_batchnorm():
    with pytest.raises(ValueError, match="`model` \\(MLP\\) has no BatchNorm layer"):
        MCBatchNormRegression(MLP(2, [8], 2))
    with pytest.raises(ValueError, match="`num_mc_samples_test` must be a positive integer"):
        MCBatchNormRegression(MLP(2, [8], 2, batch_norm=True), num_mc_samples_test=0)


def test_mc_batchnorm_too_few_batches_and_too_many_samples():
    network = MLP(2, [8], 2, batch_norm=True)
    method = MCBatchNormRegression(network, num_mc_samples_test=4)
    with pytest.raises(ValueError, match="gave 1 full-size batches"):
        method.collect_statistics(iter([torch.randn(8, 2)]))  # one pass, one batch
    assert collect_batch_statistics(network, [torch.randn(8, 2)] * 2) == 2
    with pytest.raises(ValueError, match="4 samples asked of MCBatchNorm1d, which stores 2"):
        sample_forward(network.eval(), torch.randn(3, 2), 4)


# -- test-time augmentation ------------------------------------------------------------------------
def test_tta_list_of_transforms_equals_a_loop_in_one_forward():
    torch.manual_seed(0)
    network = MLP(2, [8], 3)
    calls = []
    network.register_forward_hook(lambda m, inputs, out: calls.append(inputs[0].shape[0]))
    transforms = [nn.Identity(), Flip([-1]), lambda x: 2.0 * x]
    method = TTAClassification(network, transforms=transforms)
    x = torch.randn(5, 2)
    preds = method.predict_step(x)
    assert calls == [15]  # the 3 augmentations of 5 points: one forward pass
    with torch.no_grad():
        expected = torch.stack([network(t(x)) for t in transforms])
    torch.testing.assert_close(preds["logits"], expected)
    assert preds["pred"].shape == (5, 3) and (preds["epistemic_uct"] > 0).all()


def test_tta_random_callable_runs_once_on_the_stacked_copies():
    torch.manual_seed(0)
    seen = []

    def noise(x):
        seen.append(tuple(x.shape))
        return x + 0.3 * torch.randn_like(x)

    method = TTARegression(MLP(1, [8], 2), transforms=noise, num_mc_samples_test=7)
    preds = method.predict_step(torch.linspace(-1, 1, 4).unsqueeze(-1))
    assert seen == [(28, 1)]
    assert preds["samples"].shape == (7, 4, 1)
    assert (preds["epistemic_uct"] > 0).all()  # the augmentation spread
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
    )


def test_tta_wraps_a_fitted_method_and_only_predicts():
    seed_everything(0)
    x = torch.randn(64, 2)
    labels = (x[:, 0] > 0).long()
    dm = ArrayDataModule(x[:48], labels[:48], x[48:], labels[48:], batch_size=16)
    inner = MCDropoutClassification(MLP(2, [8], 2, dropout_p=0.2), num_mc_samples_test=3)
    _quiet(max_epochs=1).fit(inner, dm)
    tta = TTAClassification(inner, transforms=[nn.Identity(), GaussianNoise(0.1)])
    assert tta.criterion is inner.criterion
    preds = tta.predict_step(x[:5])
    assert preds["logits"].shape == (6, 5, 2)  # 3 masks x 2 augmentations
    metrics = _quiet().validate(tta, dm, verbose=False)[0]
    assert 0.0 <= metrics["val_accuracy"] <= 1.0
    with pytest.raises(TypeError, match="wraps the fitted method MCDropoutClassification"):
        _quiet(fast_dev_run=True).fit(tta, dm)
    with pytest.raises(TypeError, match="`model` of TTARegression must be a backbone or a fitted"):
        TTARegression(inner, transforms=[nn.Identity()])


def test_tta_bad_transforms():
    with pytest.raises(ValueError, match="`transforms` is required"):
        TTARegression(MLP(1, [4], 2))
    with pytest.raises(ValueError, match="`transforms` must be a non-empty list"):
        TTARegression(MLP(1, [4], 2), transforms=[])
    with pytest.raises(TypeError, match="every entry of `transforms` must be callable"):
        TTARegression(MLP(1, [4], 2), transforms=[nn.Identity(), 3])
    method = TTARegression(MLP(2, [4], 2), transforms=[lambda x: x[:, :1]])
    with pytest.raises(ValueError, match="transforms must keep the shape"):
        method.predict_step(torch.randn(3, 2))
    with pytest.raises(ValueError, match="`dims` must name input dimensions other than 0"):
        Flip([0])
