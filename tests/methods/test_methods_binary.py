"""Binary and multilabel classification (sigmoid outputs, ``BinaryClassificationTask``).

The predictive: per label ``h(pbar) = mean_s h(p_s) + MI`` against a direct computation, the
``[N]`` keys the sums over the labels, ``L = 1`` equal to the softmax predictive of the logits
``(0, z)``, saturated logits finite. Fits: a deterministic binary classifier separates two moons
(test accuracy > 0.97); a deep ensemble's epistemic part (mutual information) is far larger off
the data than on it; a multilabel fit with per-label metrics. Bad targets and widths are refused
with messages naming the fix.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from lightning import Trainer, seed_everything

from uq_box.datamodules import ArrayDataModule, TwoMoonsDatamodule
from uq_box.methods import (
    BNNVIBinaryClassification,
    DeepEnsembleBinaryClassification,
    DeterministicBinaryClassification,
    MCDropoutBinaryClassification,
)
from uq_box.methods.predictive_binary import binary_entropy, binary_metrics, binary_predictive
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.models import MLP


def _quiet(**extra) -> Trainer:
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def _h(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.log() + (1 - p) * (1 - p).log())


def test_entropy_identity_per_label_and_summed():
    torch.manual_seed(0)
    logits = 2.0 * torch.randn(7, 5, 3, dtype=torch.float64)  # S=7, N=5, L=3
    preds = binary_predictive(logits)
    probs = logits.sigmoid()
    pbar = probs.mean(0)
    torch.testing.assert_close(preds["pred"], pbar)
    total, aleatoric = _h(pbar), _h(probs).mean(0)
    torch.testing.assert_close(preds["pred_uct_per_label"], total)
    torch.testing.assert_close(preds["aleatoric_uct_per_label"], aleatoric)
    torch.testing.assert_close(preds["epistemic_uct_per_label"], total - aleatoric)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        torch.testing.assert_close(preds[key], preds[f"{key}_per_label"].sum(-1))
    torch.testing.assert_close(preds["pred_uct"], preds["aleatoric_uct"] + preds["epistemic_uct"])
    assert (preds["epistemic_uct_per_label"] >= 0).all()
    assert (preds["pred_uct"] <= 3 * math.log(2)).all()
    torch.testing.assert_close(binary_entropy(pbar), total)


def test_binary_is_the_softmax_predictive_of_logits_zero_and_z():
    torch.manual_seed(1)
    z = 3.0 * torch.randn(6, 4, 1, dtype=torch.float64)
    sigmoid = binary_predictive(z)
    softmax = classification_predictive(torch.cat([torch.zeros_like(z), z], -1))
    torch.testing.assert_close(sigmoid["pred"][:, 0], softmax["pred"][:, 1])
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        torch.testing.assert_close(sigmoid[key], softmax[key])


def test_saturated_logits_are_finite():
    logits = torch.tensor([[[1e4, -1e4]], [[-1e4, -1e4]]])  # S=2, N=1, L=2
    preds = binary_predictive(logits)
    assert all(torch.isfinite(v).all() for v in preds.values())
    torch.testing.assert_close(preds["pred"], torch.tensor([[0.5, 0.0]]))
    # label 0: the members disagree with certainty: all mutual information, no aleatoric part
    torch.testing.assert_close(preds["epistemic_uct_per_label"], torch.tensor([[math.log(2), 0.0]]))
    torch.testing.assert_close(preds["aleatoric_uct"], torch.tensor([0.0]))


def _moons() -> TwoMoonsDatamodule:
    return TwoMoonsDatamodule(n_points=200, n_test=200, noise=0.1, batch_size=50)


def test_deterministic_binary_classifier_separates_two_moons():
    seed_everything(0)
    dm = _moons()
    method = DeterministicBinaryClassification(
        MLP(2, [32, 32], 1), optimizer=partial(torch.optim.Adam, lr=1e-2)
    )
    _quiet(max_epochs=30).fit(method, dm)
    metrics = _quiet().test(method, dm, verbose=False)[0]
    assert metrics["test_accuracy"] > 0.97, metrics
    assert metrics["test_nll"] < 0.1 and metrics["test_brier"] < 0.03, metrics
    preds = method.predict_step(dm.X_test)
    assert preds["pred"].shape == (len(dm.X_test), 1)
    assert (preds["epistemic_uct"] == 0).all()  # one network


def test_deep_ensemble_epistemic_part_rises_off_the_data():
    seed_everything(0)
    dm = _moons()
    method = DeepEnsembleBinaryClassification(
        MLP(2, [32, 32], 1), num_members=5, optimizer=partial(torch.optim.Adam, lr=1e-2)
    )
    _quiet(max_epochs=30).fit(method, dm)
    on_data = method.predict_step(dm.X_test)
    angles = torch.linspace(0, 2 * math.pi, 64)
    far = 6.0 * torch.stack([angles.cos(), angles.sin()], -1) + torch.tensor([0.5, 0.25])
    off_data = method.predict_step(far)
    mi_on, mi_off = on_data["epistemic_uct"].mean(), off_data["epistemic_uct"].mean()
    assert mi_off > 20 * mi_on, (mi_on, mi_off)
    assert on_data["logits"].shape == (5, len(dm.X_test), 1)


def test_multilabel_fit_with_per_label_metrics():
    seed_everything(0)
    x = torch.randn(240, 2)
    targets = torch.stack([x[:, 0] > 0, x[:, 1] > 0, x.sum(-1) > 0.5], -1).long()  # [N, 3]
    dm = ArrayDataModule(x[:160], targets[:160], x[160:], targets[160:], batch_size=40)
    method = MCDropoutBinaryClassification(
        MLP(2, [32], 3, dropout_p=0.1),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        num_mc_samples_test=8,
    )
    _quiet(max_epochs=30).fit(method, dm)
    preds = method.predict_step(x[160:])
    assert preds["pred"].shape == (80, 3) and preds["logits"].shape == (8, 80, 3)
    assert preds["epistemic_uct_per_label"].shape == (80, 3)
    per_label = binary_metrics(preds["pred"], targets[160:])
    assert per_label["accuracy"].shape == (3,)
    assert (per_label["accuracy"] > 0.9).all(), per_label
    metrics = _quiet().validate(method, dm, verbose=False)[0]
    # the pooled metrics average the labels' two-class problems (the NLL, Brier and accuracy
    # exactly; the dropout masks differ between the two predictions)
    assert metrics["val_accuracy"] == pytest.approx(per_label["accuracy"].mean().item(), abs=0.03)
    assert metrics["val_brier"] == pytest.approx(per_label["brier"].mean().item(), abs=0.02)


def test_bad_targets_and_widths():
    x = torch.randn(32, 2)
    fit = _quiet(fast_dev_run=True)
    three_classes = ArrayDataModule(x, torch.arange(32) % 3, x, torch.arange(32) % 3, batch_size=8)
    with pytest.raises(ValueError, match="targets must be 0 or 1"):
        fit.fit(DeterministicBinaryClassification(MLP(2, [4], 1)), three_classes)
    binary = ArrayDataModule(x, torch.arange(32) % 2, x, torch.arange(32) % 2, batch_size=8)
    with pytest.raises(
        ValueError, match=r"gives 2 outputs .* \(set the network.s `n_outputs` to 1\)"
    ):
        fit.fit(BNNVIBinaryClassification(MLP(2, [4], 2)), binary)
    # float labels are fine (booleans too, where the data pipeline passes them)
    floats = ArrayDataModule(x, (x[:, 0] > 0).float(), x, (x[:, 0] > 0).long(), batch_size=8)
    fit.fit(DeterministicBinaryClassification(MLP(2, [4], 1)), floats)
