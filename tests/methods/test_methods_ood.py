"""The OOD protocol: scores by their formulas and direction, Mahalanobis against numpy, and
``evaluate_ood`` on trained classifiers.

- each logit score equals its closed form and is oriented higher = more OOD;
- the Mahalanobis scorer equals a numpy fit (class means, tied covariance, pseudo-inverse);
- a digits classifier trained without the 8s and 9s flags them by entropy with AUROC > 0.9, and
  the same protocol with the sign flipped gives < 0.1 (a test that fails if the direction were
  inverted); every metric of the table equals scikit-learn's on the returned scores;
- on two moons vs a far-away cloud the softmax scores of a ReLU network fail (it grows more
  confident away from the data, Hein et al. 2019), Mahalanobis on its hidden layer does not;
- errors: an OOD pair of different input shapes, unknown scores, a bad layer.
"""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from uq_box.datamodules import DigitsDatamodule, TwoMoonsDatamodule
from uq_box.datamodules.ood import (
    DigitsHeldOutDatamodule,
    FarCloudDatamodule,
    NoiseImagesDatamodule,
    RotatedDigitsDatamodule,
)
from uq_box.methods import (
    DeepEnsembleClassification,
    DeterministicClassification,
    MVERegression,
    VectorScaling,
)
from uq_box.methods.ood import (
    LOGIT_SCORES,
    MahalanobisScorer,
    energy_score,
    entropy_score,
    evaluate_ood,
    max_logit_score,
    max_softmax_score,
    mutual_information_score,
    ood_scores,
)
from uq_box.models import MLP


def train(x, y, n_inputs, n_classes, hidden=(64,), steps=200, seed=0):
    """A plain full-batch Adam fit of an MLP, wrapped as a deterministic classifier."""
    torch.manual_seed(seed)
    network = MLP(n_inputs, list(hidden), n_classes)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(x), y).backward()
        optimizer.step()
    return DeterministicClassification(network)


@pytest.fixture(scope="module")
def held_out():
    dm = DigitsHeldOutDatamodule(held_out_classes=(8, 9), flatten=True, seed=0)
    return dm, train(*dm.split("train"), 64, 8)


def test_logit_scores_closed_forms_and_direction():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(4, 6, 5, generator=gen, dtype=torch.float64)
    p = logits.softmax(-1)
    pbar = p.mean(0)
    entropy = -(pbar * pbar.log()).sum(-1)
    expected = (-(p * p.log()).sum(-1)).mean(0)
    torch.testing.assert_close(max_softmax_score(logits), 1 - pbar.max(-1).values)
    torch.testing.assert_close(entropy_score(logits), entropy)
    torch.testing.assert_close(mutual_information_score(logits), entropy - expected)
    torch.testing.assert_close(max_logit_score(logits), -logits.max(-1).values.mean(0))
    lse = torch.log(torch.exp(logits / 2.0).sum(-1))
    torch.testing.assert_close(energy_score(logits, temperature=2.0), (-2.0 * lse).mean(0))
    assert set(ood_scores(logits)) == set(LOGIT_SCORES)
    # direction: a confident point scores lower than a flat one, for every score
    confident = torch.tensor([[[10.0, 0.0, 0.0]], [[10.0, 0.0, 0.0]]])
    flat = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    disagree = torch.tensor([[[10.0, 0.0, 0.0]], [[0.0, 10.0, 0.0]]])
    for name, score in LOGIT_SCORES.items():
        if name != "mutual_information":  # the samples agree on both: 0 up to round-off
            assert score(flat).item() > score(confident).item(), name
    assert mutual_information_score(disagree).item() > mutual_information_score(flat).item()
    assert mutual_information_score(confident[:1]).item() == 0.0  # one sample
    with pytest.raises(ValueError, match="`temperature`"):
        energy_score(logits, temperature=0.0)
    with pytest.raises(ValueError, match="`scores` holds unknown names \\['softmax'\\]"):
        ood_scores(logits, ["entropy", "softmax"])
    with pytest.raises(ValueError, match="`logits` must have shape \\[S, N, C\\]"):
        max_logit_score(logits[0])


def test_mahalanobis_matches_numpy(held_out):
    dm, model = held_out
    x, y = dm.split("train")
    scorer = MahalanobisScorer(model, layer="model.2").fit(x, y)  # after the hidden ReLU
    # the features by hand: the hidden layer's activations
    network = model.model
    hook_features = scorer.features(x[:5])
    f = scorer.features(x).numpy()
    labels = y.numpy()
    means = np.stack([f[labels == c].mean(0) for c in range(8)])
    centred = f - means[labels]
    precision = np.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
    x_test = dm.split("test")[0][:50]
    g = scorer.features(x_test).numpy()
    diffs = g[:, None, :] - means[None]
    expected = np.einsum("ncd,de,nce->nc", diffs, precision, diffs).min(1)
    np.testing.assert_allclose(scorer.score(x_test).numpy(), expected, rtol=1e-7, atol=1e-8)
    assert hook_features.shape == (5, f.shape[1]) and hook_features.dtype == torch.float64
    # a method or its network give the same scorer
    same = MahalanobisScorer(network, layer="model.2").fit(x, y)
    torch.testing.assert_close(same.score(x_test), scorer.score(x_test))
    with pytest.raises(ValueError, match="`layer` must name a submodule.*'model.0'"):
        MahalanobisScorer(model, layer="fc")
    with pytest.raises(ValueError, match="`layer` 'model.1' runs 2 times"):  # one shared ReLU
        MahalanobisScorer(train(x[:20], y[:20] % 2, 64, 2, (8, 8), 1), "model.1").fit(x, y)
    with pytest.raises(RuntimeError, match="not fitted"):
        MahalanobisScorer(model, layer="model.2").score(x_test)
    with pytest.raises(ValueError, match="`y` must hold an integer class label"):
        MahalanobisScorer(model, layer="model.2").fit(x, y.float())


def test_held_out_digits_direction(held_out):
    dm, model = held_out
    ood = dm.ood_datamodule()
    table, s_in, s_out = evaluate_ood(model, dm, ood, layer="model.2", return_scores=True)
    print(table)
    assert list(table.columns) == ["auroc", "aupr_in", "aupr_out", "fpr95"]
    assert list(table.index) == [*LOGIT_SCORES, "mahalanobis"]
    # the direction: entropy flags the unseen classes; flipped, the protocol is worse than chance
    for name in ("msp", "entropy", "max_logit", "energy"):  # 0.94 .. 0.95
        assert table.loc[name, "auroc"] > 0.9, name
    assert table.loc["mahalanobis", "auroc"] > 0.75  # 0.83 on the hidden layer
    flipped = evaluate_ood(model, dm, ood, scores=["entropy"])
    flipped_auroc = roc_auc_score(
        np.r_[np.zeros(len(s_in["entropy"])), np.ones(len(s_out["entropy"]))],
        -np.r_[s_in["entropy"].numpy(), s_out["entropy"].numpy()],
    )
    assert flipped_auroc < 0.1
    assert flipped.loc["entropy", "auroc"] == pytest.approx(table.loc["entropy", "auroc"])
    # one network: no disagreement, every input ties, chance level
    assert table.loc["mutual_information", "auroc"] == 0.5
    # every number is scikit-learn's on the returned scores
    for name in table.index:
        labels = np.r_[np.zeros(len(s_in[name])), np.ones(len(s_out[name]))]
        scores = np.r_[s_in[name].numpy(), s_out[name].numpy()]
        assert table.loc[name, "auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert table.loc[name, "aupr_out"] == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
        assert table.loc[name, "aupr_in"] == pytest.approx(
            average_precision_score(1 - labels, -scores), abs=1e-12
        )
    assert s_in["entropy"].shape == (len(dm.split("test")[0]),)
    assert s_out["energy"].shape == (len(ood.split("test")[0]),)


def test_two_moons_far_cloud_needs_features():
    dm = TwoMoonsDatamodule(n_points=500, seed=0)
    model = train(*dm.split("train"), 2, 2, hidden=(32, 32), steps=300)
    table = evaluate_ood(model, dm, FarCloudDatamodule(), layer="model.5")
    print(table)
    assert table.loc["mahalanobis", "auroc"] > 0.99
    assert table.loc["mahalanobis", "fpr95"] < 0.05
    # the ReLU network is confident far from the data: its softmax scores miss the cloud
    assert table.loc["entropy", "auroc"] < 0.5


def test_ensemble_noise_and_rotation():
    digits = DigitsDatamodule(flatten=True, seed=0)
    x, y = digits.split("train")
    members = [train(x, y, 64, 10, steps=60, seed=s).model for s in range(3)]
    ensemble = DeepEnsembleClassification(members, num_members=None)
    noise = NoiseImagesDatamodule(n_images=300, distribution="gaussian", flatten=True)
    table = evaluate_ood(ensemble, digits, noise)
    print(table)
    assert table.loc["mutual_information", "auroc"] > 0.8  # members disagree on noise
    assert table.loc["entropy", "auroc"] > 0.8
    rotated = evaluate_ood(ensemble, digits, RotatedDigitsDatamodule(digits, 90.0))
    assert rotated.shape == (5, 4) and bool(np.isfinite(rotated.to_numpy()).all())


def test_protocol_errors(held_out):
    dm, model = held_out
    images = NoiseImagesDatamodule(n_images=10)  # [1, 8, 8] images; dm gives [64] vectors
    with pytest.raises(
        ValueError,
        match=r"`ood_datamodule` \(NoiseImagesDatamodule\) gives inputs of shape \[1, 8, 8\].*`id_datamodule`.*\[64\]",
    ):
        evaluate_ood(model, dm, images)
    ood = dm.ood_datamodule()
    with pytest.raises(ValueError, match="`scores` must be a non-empty list"):
        evaluate_ood(model, dm, ood, scores=["entropy", "odin"])
    with pytest.raises(ValueError, match="'mahalanobis' but no `layer`"):
        evaluate_ood(model, dm, ood, scores=["mahalanobis"])
    with pytest.raises(ValueError, match="`layer` must name a submodule"):
        evaluate_ood(model, dm, ood, layer="nope")
    with pytest.raises(TypeError, match="`method` must be a fitted classification method"):
        evaluate_ood(MVERegression(MLP(64, [4], 2)), dm, ood)
    with pytest.raises(TypeError, match="`ood_datamodule` must be a data module"):
        evaluate_ood(model, dm, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="`id_datamodule` .* has no 'calib' split"):
        evaluate_ood(model, dm, ood, split="calib")
    assert math.isfinite(evaluate_ood(model, dm, ood, scores="energy").loc["energy", "fpr95"])
    # a calibrated wrapper: its own logits, the wrapped network's features
    scaled = VectorScaling(model).calibrate(dm)
    table = evaluate_ood(scaled, dm, ood, scores=["entropy", "mahalanobis"], layer="model.2")
    plain = evaluate_ood(model, dm, ood, scores=["mahalanobis"], layer="model.2")
    assert table.loc["mahalanobis", "auroc"] == plain.loc["mahalanobis", "auroc"]
    # 0.86: calibrating on in-distribution data softens the entropy ranking (0.94 raw)
    assert table.loc["entropy", "auroc"] > 0.8
