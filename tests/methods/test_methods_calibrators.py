"""Post-hoc calibrators beside temperature scaling, by numbers.

- every calibrator lowers the NLL (the logit maps) or the ECE (the binning maps) of an
  over-confident, biased classifier on held-out data;
- vector scaling with all weights equal to 1 / T and no bias is temperature scaling, and fitted
  on a purely over-tempered classifier it finds equal weights 1 / T;
- Dirichlet calibration's ODIR penalty is its closed form and shrinks the off-diagonal weights;
- histogram binning's bins and isotonic regression's map equal direct numpy / scikit-learn fits;
- Lightning's validation loop, checkpoints, several samples and the errors.
"""

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from sklearn.isotonic import IsotonicRegression
from torch import nn

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import (
    DeepEnsembleClassification,
    DeterministicClassification,
    MVERegression,
    TemperatureScaling,
)
from uq_box.methods.calibrators import (
    DirichletCalibration,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    VectorScaling,
)
from uq_box.metrics.functional_calibration import adaptive_calibration_error
from uq_box.metrics.functional_classification import expected_calibration_error, multiclass_nll
from uq_box.models import MLP

D, C = 5, 4
TEMPERATURE = 4.0
BIAS = torch.tensor([1.0, -0.5, 0.0, 0.5])
CALIBRATORS = [
    VectorScaling,
    MatrixScaling,
    DirichletCalibration,
    HistogramBinning,
    IsotonicCalibration,
]


@pytest.fixture(scope="module")
def data():
    """Multinomial logistic data; the true logits are x @ weight.T."""
    generator = torch.Generator().manual_seed(0)
    weight = 0.8 * torch.randn(C, D, generator=generator)

    def sample(n):
        x = torch.randn(n, D, generator=generator)
        y = torch.multinomial((x @ weight.T).softmax(-1), 1, generator=generator)[:, 0]
        return x, y

    return ArrayDataModule(*sample(50), *sample(3000), *sample(5000)), weight


def classifier(weight, temperature=TEMPERATURE, bias=BIAS):
    network = nn.Linear(D, C)
    with torch.no_grad():
        network.weight.copy_(temperature * weight)
        network.bias.copy_(bias)
    return DeterministicClassification(network)


@pytest.mark.parametrize("cls", CALIBRATORS, ids=lambda c: c.__name__)
def test_calibrator_improves_an_overconfident_classifier(data, cls):
    dm, weight = data
    model = classifier(weight)
    calibrated = cls(model).calibrate(dm)  # the val split
    assert calibrated.is_calibrated and int(calibrated.num_calibration_points) == 3000
    raw, after = model.predict_step(dm.X_test), calibrated.predict_step(dm.X_test)
    y = dm.Y_test
    torch.testing.assert_close(after["pred"].sum(-1), torch.ones(len(y)))
    nll_before, nll_after = multiclass_nll(raw["pred"], y), multiclass_nll(after["pred"], y)
    ece_before = expected_calibration_error(raw["pred"], y)
    ece_after = expected_calibration_error(after["pred"], y)
    ada_before = adaptive_calibration_error(raw["pred"], y)
    ada_after = adaptive_calibration_error(after["pred"], y)
    print(cls.__name__, nll_before, nll_after, ece_before, ece_after, ada_before, ada_after)
    assert ece_after < 0.4 * ece_before and ece_after < 0.04, (ece_before, ece_after)
    assert ada_after < 0.4 * ada_before, (ada_before, ada_after)
    if cls in (VectorScaling, MatrixScaling, DirichletCalibration):
        assert nll_after < nll_before - 0.3, (nll_before, nll_after)
        # the logit maps reach the NLL of the true model within a few hundredths
        truth = multiclass_nll((dm.X_test @ weight.T).softmax(-1), y)
        assert nll_after < truth + 0.02, (truth, nll_after)
        assert after["logits"].shape == (1, 5000, C)
    else:
        assert after["logits"].shape == (1, 5000, C)
        assert float(after["epistemic_uct"].abs().max()) == 0.0
    # Lightning's test loop logs the same numbers
    logged = quiet_trainer().test(calibrated, dm, verbose=False)[0]
    assert logged["test_ece"] == pytest.approx(ece_after.item(), abs=1e-5)


def test_vector_scaling_with_equal_weights_is_temperature_scaling(data):
    dm, weight = data
    model = classifier(weight, bias=torch.zeros(C))  # miscalibrated by a temperature only
    scaling = TemperatureScaling(model).calibrate(dm)
    temperature = scaling.temperature.item()
    assert temperature == pytest.approx(TEMPERATURE, rel=0.1)
    vector = VectorScaling(model).calibrate(dm)
    # set by hand: w = 1 / T for every class, b = 0
    manual = VectorScaling(model).calibrate(dm)
    manual.weight = torch.full((C,), 1.0 / temperature, dtype=torch.float64)
    manual.bias = torch.zeros(C, dtype=torch.float64)
    by_temperature, by_vector = scaling.predict_step(dm.X_test), manual.predict_step(dm.X_test)
    for key in ("pred", "pred_uct", "logits"):
        torch.testing.assert_close(by_vector[key], by_temperature[key], rtol=1e-5, atol=1e-6)
    # the fitted vector scaling finds (nearly) equal weights 1 / T and no bias
    print("vector", vector.weight, vector.bias, 1 / temperature)
    np.testing.assert_allclose(vector.weight.numpy(), 1.0 / temperature, rtol=0.15)
    np.testing.assert_allclose(vector.bias.numpy(), 0.0, atol=0.1)


def test_dirichlet_penalty_and_regularization(data):
    dm, weight = data
    model = classifier(weight)
    dirichlet = DirichletCalibration(model, off_diagonal_reg=0.3, intercept_reg=0.2)
    w = torch.arange(16.0).reshape(4, 4)
    b = torch.tensor([1.0, 2.0, -1.0, 0.5])
    off = (w.square().sum() - torch.diagonal(w).square().sum()) / (4 * 3)
    expected = 0.3 * off + 0.2 * b.square().sum() / 4
    assert dirichlet.penalty(w, b).item() == pytest.approx(expected.item(), rel=1e-12)
    # the identity map is the uncalibrated model
    free = DirichletCalibration(model, off_diagonal_reg=0.0, intercept_reg=0.0).calibrate(dm)
    strong = DirichletCalibration(model, off_diagonal_reg=1e4, intercept_reg=0.0).calibrate(dm)

    def off_diagonal(m):
        return (m.weight - torch.diag_embed(torch.diagonal(m.weight))).abs().max().item()

    print("off-diagonal", off_diagonal(free), off_diagonal(strong))
    assert off_diagonal(free) > 0.02
    assert off_diagonal(strong) < 0.05 * off_diagonal(free)
    # the map acts on log-probabilities: adding a constant to every logit changes nothing
    logits = model.predict_step(dm.X_test[:7])["logits"]
    torch.testing.assert_close(
        free.calibrated_logits(logits).softmax(-1), free.calibrated_logits(logits + 3.0).softmax(-1)
    )


def test_histogram_binning_bins_by_hand(data):
    dm, weight = data
    model = classifier(weight)
    probs = model.predict_step(dm.X_val)["logits"][0].double().softmax(-1).numpy()
    y = dm.Y_val.numpy()
    for binning in ("equal_width", "equal_mass"):
        binner = HistogramBinning(model, num_bins=10, binning=binning).calibrate(dm)
        for c in range(C):
            p, hit = probs[:, c], (y == c).astype(float)
            if binning == "equal_width":
                edges = np.arange(1, 10) / 10
            else:
                edges = np.quantile(p, np.arange(1, 10) / 10)
            np.testing.assert_allclose(binner.edges[c].numpy(), edges, rtol=1e-12)
            index = np.searchsorted(edges, p, side="left")  # (e_{b-1}, e_b]
            full = np.r_[0.0, edges, 1.0]
            for b in range(10):
                inside = index == b
                value = hit[inside].mean() if inside.any() else (full[b] + full[b + 1]) / 2
                assert binner.bin_values[c, b].item() == pytest.approx(value, abs=1e-12)
        # a test point takes its bins' values, renormalized
        test_probs = model.predict_step(dm.X_test[:20])["pred"].double()
        mapped = binner.one_vs_rest(test_probs)
        expected = mapped / mapped.sum(-1, keepdim=True)
        torch.testing.assert_close(binner.calibrated_probs(test_probs), expected)


def test_isotonic_matches_scikit_learn(data):
    dm, weight = data
    model = classifier(weight)
    isotonic = IsotonicCalibration(model).calibrate(dm)
    probs = model.predict_step(dm.X_val)["logits"][0].double().softmax(-1).numpy()
    y = dm.Y_val.numpy()
    test_probs = model.predict_step(dm.X_test)["pred"].double()
    # include points beyond the calibration range on both sides
    test_probs = torch.cat([test_probs, torch.eye(C, dtype=torch.float64)])
    mapped = isotonic.one_vs_rest(test_probs).numpy()
    for c in range(C):
        reference = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
        reference.fit(probs[:, c], (y == c).astype(float))
        np.testing.assert_allclose(
            mapped[:, c], reference.predict(test_probs[:, c].numpy()), atol=1e-12
        )
        assert np.all(np.diff(mapped[np.argsort(test_probs[:, c].numpy()), c]) >= -1e-12)


def test_lightning_validation_checkpoint_and_several_samples(data, tmp_path):
    dm, weight = data
    model = classifier(weight)
    direct = MatrixScaling(model).calibrate(dm)
    through = MatrixScaling(model)
    (logged,) = quiet_trainer().validate(through, datamodule=dm, verbose=False)
    assert logged["calibration_points"] == 3000
    torch.testing.assert_close(through.weight, direct.weight)
    # the fitted buffers, sized by the number of classes, load into a fresh wrapper
    for cls in (MatrixScaling, HistogramBinning, IsotonicCalibration):
        fitted = direct if cls is MatrixScaling else cls(model).calibrate(dm)
        fresh = cls(model)
        fresh.load_state_dict(fitted.state_dict())
        assert fresh.is_calibrated
        torch.testing.assert_close(
            fresh.predict_step(dm.X_test)["pred"], fitted.predict_step(dm.X_test)["pred"]
        )
    # an ensemble: the affine maps keep its members, the binning maps give one distribution
    generator = torch.Generator().manual_seed(1)
    members = []
    for _ in range(3):
        member = nn.Linear(D, C)
        with torch.no_grad():
            member.weight.copy_(model.model.weight + torch.randn(C, D, generator=generator))
            member.bias.copy_(BIAS)
        members.append(member)
    ensemble = DeepEnsembleClassification(members, num_members=None)
    vector = VectorScaling(ensemble).calibrate(dm)
    out = vector.predict_step(dm.X_test)
    assert out["logits"].shape == (3, 5000, C) and bool((out["epistemic_uct"] > 0).any())
    raw = ensemble.predict_step(dm.X_test)
    assert multiclass_nll(out["pred"], dm.Y_test) < multiclass_nll(raw["pred"], dm.Y_test) - 0.3
    assert IsotonicCalibration(ensemble).calibrate(dm).predict_step(dm.X_test)["logits"].shape == (
        1,
        5000,
        C,
    )


@pytest.mark.parametrize("cls", CALIBRATORS, ids=lambda c: c.__name__)
def test_calibrator_errors(data, cls):
    dm, weight = data
    model = classifier(weight)
    with pytest.raises(TypeError, match="`model`.*classification"):
        cls(MVERegression(MLP(1, [4], 2)))
    wrapper = cls(model)
    with pytest.raises(RuntimeError, match="not calibrated.*'val'"):
        wrapper.predict_step(dm.X_test)
    no_val = ArrayDataModule(dm.X_train, dm.Y_train, X_test=dm.X_test, y_test=dm.Y_test)
    with pytest.raises(ValueError, match=r"no 'val' split; it has \['train', 'test'\].*`split`"):
        wrapper.calibrate(no_val)
    with pytest.raises(ValueError, match="no 'calib' split"):
        wrapper.calibrate(dm, split="calib")
    with pytest.raises(ValueError, match="integer class indices"):
        wrapper.calibrate((dm.X_val, dm.Y_val.float()))
    with pytest.raises(RuntimeError, match="nothing to train"):
        quiet_trainer(max_epochs=1).fit(wrapper, dm)


def test_calibrator_argument_errors(data):
    _, weight = data
    model = classifier(weight)
    with pytest.raises(ValueError, match="`max_iter`"):
        VectorScaling(model, max_iter=0)
    with pytest.raises(ValueError, match="`off_diagonal_reg`"):
        MatrixScaling(model, off_diagonal_reg=-1.0)
    with pytest.raises(ValueError, match="`intercept_reg`"):
        DirichletCalibration(model, intercept_reg=float("nan"))
    with pytest.raises(ValueError, match="`num_bins`"):
        HistogramBinning(model, num_bins=0)
    with pytest.raises(ValueError, match="`binning`"):
        HistogramBinning(model, binning="quantile")
    # a calibration set classified without error: the NLL has no minimum, a warning
    x = torch.randn(40, D)
    y = model.predict_step(x)["pred"].argmax(-1)
    with pytest.warns(UserWarning, match="classified correctly"):
        VectorScaling(model, max_iter=20).calibrate((x, y))
