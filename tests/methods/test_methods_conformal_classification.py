"""Conformal prediction sets by numbers: LAC, APS, RAPS, randomized or not, class-conditional.

- the scores of a hand-made example, and the sets of a direct numpy implementation (the size rule
  of Angelopoulos et al.'s reference code);
- the finite-sample guarantee on digits: one logistic regression (a fitted
  ``DeterministicClassification``), its probabilities computed once, then 200 random
  calibration/test splits through the pure functions; the mean coverage of each score lies in
  ``[1 - alpha, 1 - alpha + 1 / (n + 1)]`` up to a Monte Carlo tolerance, and per class for the
  class-conditional sets;
- the wrapper: the contract plus ``pred_set``, calibration through ``calibrate`` and Lightning,
  the test metrics, every kind of classification method, the checkpoint round trip;
- the errors: a missing or too small calibration split, probabilities that do not sum to one.
"""

import math

import numpy as np
import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything
from torch import nn

from uq_box.datamodules import ArrayDataModule, DigitsDatamodule
from uq_box.methods import (
    BNNVIClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    MCDropoutClassification,
    SWAGClassification,
    TemperatureScaling,
)
from uq_box.methods.conformal_classification import (
    ConformalClassification,
    class_scores,
    class_thresholds,
    conformal_threshold,
    label_scores,
    minimum_calibration_points,
    prediction_sets,
)
from uq_box.methods.posthoc import conformal_rank
from uq_box.metrics.functional_sets import class_conditional_coverage, set_coverage
from uq_box.models import MLP

NUM_SPLITS = 200
N_CALIB = 50


@pytest.fixture(scope="module")
def digits():
    """A float64 logistic regression on the digits' training split, as a fitted method, and the
    probabilities of the other 1079 images (the pool the splits draw from)."""
    dm = DigitsDatamodule(flatten=True, val_fraction=0.3, test_fraction=0.3, seed=0)
    torch.manual_seed(0)
    net = nn.Linear(64, 10).double()
    x, y = dm.X_train.double(), dm.Y_train
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y) + 1e-2 * net.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    method = DeterministicClassification(net)
    pool_x = torch.cat([dm.X_val, dm.X_test]).double()
    pool_y = torch.cat([dm.Y_val, dm.Y_test])
    probs = method.predict_step(pool_x)["pred"]
    assert 0.88 < (probs.argmax(1) == pool_y).double().mean() < 0.97  # not saturated
    return method, pool_x, pool_y, probs


# -- 1. scores and sets ----------------------------------------------------------------------------
def test_class_scores_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(class_scores(probs, "lac"), 1 - probs)
    # APS: mass ranked before the class, plus u times its own (ties ranked by index)
    expected = torch.tensor([[0.5, 0.8, 1.0], [0.8, 1.0, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(class_scores(probs, "aps", u=1.0), expected)
    torch.testing.assert_close(
        class_scores(probs, "aps", u=0.0), torch.tensor([[0.0, 0.5, 0.8], [0.6, 0.8, 0.0]]).double()
    )
    u = torch.tensor([0.5, 0.25], dtype=torch.float64)
    torch.testing.assert_close(
        class_scores(probs, "aps", u=u),
        torch.tensor([[0.25, 0.65, 0.9], [0.65, 0.85, 0.15]]).double(),
    )
    # RAPS: + lam * (rank - k_reg)^+
    torch.testing.assert_close(
        class_scores(probs, "raps", u=1.0, k_reg=1, lam=0.1),
        expected + torch.tensor([[0.0, 0.1, 0.2], [0.1, 0.2, 0.0]]).double(),
    )
    torch.testing.assert_close(class_scores(probs, "raps", u=1.0, k_reg=3, lam=0.1), expected)
    torch.testing.assert_close(
        label_scores(probs, torch.tensor([1, 2]), "aps"), torch.tensor([0.8, 0.6]).double()
    )


def numpy_sets(probs, tau, u, randomized, k_reg, lam):
    """The set-size rule of Angelopoulos et al.'s reference code (``gcq``), per point.

    Classes in order of probability until the penalized cumulative mass exceeds ``tau``, the
    crossing one included; randomized, the last one is dropped when ``u > V``. We allow empty
    sets (their ``allow_zero_sets=True``), which the guarantee needs. Non-randomized with
    ``lam = 0`` this is our ``u = 0`` set.
    """
    n, c = probs.shape
    out = np.zeros((n, c), dtype=bool)
    for i in range(n):
        order = np.argsort(-probs[i], kind="stable")
        ordered = probs[i][order]
        cumsum = np.cumsum(ordered)
        penalty = np.cumsum([lam if r >= k_reg else 0.0 for r in range(c)])
        size = min(int(np.sum(cumsum + penalty <= tau)) + 1, c)
        if randomized:
            v = (tau - (cumsum[size - 1] - ordered[size - 1]) - penalty[size - 1]) / ordered[
                size - 1
            ]
            size -= int(u[i] > v)
        out[i, order[:size]] = True
    return out


@pytest.mark.parametrize(
    ("score", "k_reg", "lam"), [("aps", 1, 0.0), ("raps", 1, 0.05), ("raps", 2, 0.2)]
)
def test_randomized_sets_match_the_reference_rule(score, k_reg, lam):
    gen = torch.Generator().manual_seed(0)
    probs = (2 * torch.randn(300, 6, generator=gen, dtype=torch.float64)).softmax(-1)
    u = torch.rand(300, generator=gen, dtype=torch.float64)
    for tau in (0.3, 0.7, 0.9, 1.05):
        sets = prediction_sets(probs, tau, score, True, k_reg, lam, u=u)
        expected = numpy_sets(probs.numpy(), tau, u.numpy(), True, k_reg, lam)
        assert np.array_equal(sets.numpy(), expected), tau
        if score == "aps":
            unrandomized = prediction_sets(probs, tau, score, False)
            assert np.array_equal(
                unrandomized.numpy(), numpy_sets(probs.numpy(), tau, u.numpy(), False, 0, 0.0)
            )
            assert (unrandomized | ~sets).all()  # contains the randomized set
            assert unrandomized.any(1).all()  # never empty
    # sets are the top classes in order (nested), whatever u
    ranks = probs.argsort(1, descending=True).argsort(1)
    sizes = sets.sum(1, keepdim=True)
    assert torch.equal(sets, ranks < sizes)


def test_lac_sets_are_the_classes_above_one_minus_the_threshold():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.05, 0.05, 0.9]])
    assert prediction_sets(probs, 0.85, "lac").tolist() == [[True] * 3, [False, False, True]]
    assert prediction_sets(probs, 0.75, "lac").tolist() == [
        [True, True, False],
        [False, False, True],
    ]
    assert prediction_sets(probs, 0.15, "lac").tolist() == [[False] * 3, [False, False, True]]
    # per-class thresholds (Mondrian): class c against q_c
    q = torch.tensor([0.6, 0.96, 0.2])
    assert prediction_sets(probs, q, "lac").tolist() == [[True, True, False], [False, True, True]]


# -- 2. the finite-sample guarantee over 200 calibration/test splits of digits -------------------
def coverages_over_splits(digits, score, randomized, alpha, mondrian=False, n_calib=N_CALIB):
    """Coverage of each split ``[NUM_SPLITS]`` (and per class ``[NUM_SPLITS, C]``); the
    calibration counts per class ``[NUM_SPLITS, C]``."""
    _, _, target, probs = digits
    gen = torch.Generator().manual_seed(1)
    num_points = len(target)
    coverage, per_class, counts = [], [], []
    for _ in range(NUM_SPLITS):
        perm = torch.randperm(num_points, generator=gen)
        calib, test = perm[:n_calib], perm[n_calib:]
        # fresh draws each split, one per point whatever its role: exchangeable scores
        u = torch.rand(num_points, generator=gen, dtype=probs.dtype)
        scores = label_scores(probs[calib], target[calib], score, u[calib] if randomized else 1.0)
        if mondrian:
            threshold = class_thresholds(scores, target[calib], probs.shape[1], alpha)
        else:
            threshold = conformal_threshold(scores, alpha)
        sets = prediction_sets(probs[test], threshold, score, randomized, u=u[test])
        coverage.append(set_coverage(sets, target[test]))
        per_class.append(class_conditional_coverage(sets, target[test])[0])
        counts.append(torch.bincount(target[calib], minlength=probs.shape[1]))
    return torch.stack(coverage), torch.stack(per_class), torch.stack(counts)


def standard_error(values):
    return values.std(0) / math.sqrt(values.shape[0])


#: Monte Carlo tolerance in standard errors of the mean over the splits. The splits (and the
#: draws u) are independent given the pool, and for exchangeable scores without ties the
#: expected coverage of a split is exactly k / (n + 1) (the test point's rank among n + 1 is
#: uniform), so the mean over 200 splits is that value plus a near-Gaussian error whose standard
#: error we measure (about 0.003 at alpha = 0.1, 0.002 at 0.05, dominated by the calibration
#: set's draw); 4 standard errors are exceeded with probability 6e-5 (and the seeds are fixed).
#: A small calibration set (n = 50) makes the window [1 - alpha, 1 - alpha + 1 / (n + 1)] about
#: 6 standard errors wide: the uncorrected rank ceil(n (1 - alpha)) (coverage 45 / 51 = 0.882 at
#: alpha = 0.1) fails the test.
TOLERANCE_SE = 4.0


@pytest.mark.parametrize("alpha", [0.1, 0.05])
@pytest.mark.parametrize("score", ["lac", "aps", "raps"])
def test_marginal_coverage_over_200_splits(digits, score, alpha):
    """LAC and randomized APS/RAPS: continuous scores (no ties, checked), so the mean coverage is
    k / (n + 1), within [1 - alpha, 1 - alpha + 1 / (n + 1)]."""
    _, _, target, probs = digits
    assert label_scores(probs, target, "lac").unique().numel() == len(target)  # no ties
    coverage, _, _ = coverages_over_splits(digits, score, randomized=True, alpha=alpha)
    mean, tol = coverage.mean().item(), TOLERANCE_SE * standard_error(coverage).item()
    k = conformal_rank(N_CALIB, alpha)
    assert abs(mean - k / (N_CALIB + 1)) < tol, (mean, k / (N_CALIB + 1), tol)
    assert 1 - alpha - tol <= mean <= 1 - alpha + 1 / (N_CALIB + 1) + tol, (mean, tol)


@pytest.mark.parametrize("score", ["aps", "raps"])
def test_non_randomized_sets_are_conservative(digits, score):
    """Without randomization the sets are those of u = 0 on scores calibrated at u = 1: they
    contain the exact conformal sets, so the coverage is at least 1 - alpha, but has no upper
    bound (here about 0.996)."""
    alpha = 0.1
    coverage, _, _ = coverages_over_splits(digits, score, randomized=False, alpha=alpha)
    exact, _, _ = coverages_over_splits(digits, score, randomized=True, alpha=alpha)
    mean, tol = coverage.mean().item(), TOLERANCE_SE * standard_error(coverage).item()
    assert mean >= 1 - alpha - tol
    assert mean > exact.mean().item() + 1 / (N_CALIB + 1)  # above the randomized upper bound


@pytest.mark.parametrize(("score", "randomized"), [("lac", True), ("aps", True), ("raps", False)])
def test_class_conditional_coverage_over_200_splits(digits, score, randomized):
    """Mondrian sets cover 1 - alpha within every class: k(n_c) / (n_c + 1) given the class's
    calibration count n_c, averaged over the splits; the randomized ones stay below
    1 - alpha + E[1 / (n_c + 1)]."""
    alpha = 0.1
    _, per_class, counts = coverages_over_splits(
        digits, score, randomized, alpha, mondrian=True, n_calib=700
    )
    mean, tol = per_class.mean(0), TOLERANCE_SE * standard_error(per_class)
    assert (mean >= 1 - alpha - tol).all(), (mean, tol)
    if randomized:
        upper = 1 - alpha + (1.0 / (counts.double() + 1)).mean(0)
        assert (mean <= upper + tol).all(), (mean, upper, tol)


# -- 3. the wrapper ------------------------------------------------------------------------------
BASE_KEYS = {"pred", "pred_uct", "epistemic_uct", "aleatoric_uct", "logits"}


@pytest.mark.parametrize(
    "options",
    [
        {"score": "lac"},
        {"score": "aps"},
        {"score": "raps", "k_reg": 2, "lam": 0.1, "randomized": False},
        {"score": "aps", "mondrian": True},
    ],
)
def test_wrapper_adds_the_sets_to_the_contract(digits, options):
    method, x, y, probs = digits
    calib, test = slice(0, 500), slice(500, None)
    conformal = ConformalClassification(method, alpha=0.1, **options)
    torch.manual_seed(3)
    assert conformal.calibrate((x[calib], y[calib])) is conformal
    # the threshold of the pure functions on the same draws
    torch.manual_seed(3)
    u = torch.rand(500, dtype=torch.float64) if conformal.randomized else 1.0
    scores = label_scores(
        probs[calib], y[calib], conformal.score, u, conformal.k_reg, conformal.lam
    )
    if conformal.mondrian:
        expected = class_thresholds(scores, y[calib], 10, 0.1)
    else:
        expected = conformal_threshold(scores, 0.1).reshape(1)
    torch.testing.assert_close(conformal.threshold, expected)
    assert int(conformal.num_calibration_points) == 500

    torch.manual_seed(4)
    preds = conformal.predict_step(x[test])
    assert set(preds) == BASE_KEYS | {"pred_set"}
    for key, value in method.predict_step(x[test]).items():
        assert torch.equal(preds[key], value), key
    assert preds["pred_set"].dtype == torch.bool and preds["pred_set"].shape == (579, 10)
    torch.manual_seed(4)
    expected_sets = prediction_sets(
        probs[test],
        conformal.threshold,
        conformal.score,
        conformal.randomized,
        conformal.k_reg,
        conformal.lam,
    )
    assert torch.equal(preds["pred_set"], expected_sets)
    assert set_coverage(preds["pred_set"], y[test]) > 0.85


def test_wrapper_through_lightning_logs_the_set_metrics(digits):
    method, x, y, _ = digits
    dm = ArrayDataModule(
        x[:100].float(),
        y[:100],
        X_test=x[600:],
        y_test=y[600:],
        X_calib=x[100:600],
        y_calib=y[100:600],
    )
    seed_everything(0)
    conformal = ConformalClassification(method, alpha=0.1, score="raps")
    (logged,) = quiet_trainer().validate(
        conformal, dataloaders=dm.calib_dataloader(), verbose=False
    )
    assert conformal.is_calibrated and logged["calibration_points"] == 500
    (metrics,) = quiet_trainer().test(conformal, dm, verbose=False)
    assert {"test_set_coverage", "test_set_size", "test_accuracy", "test_nll", "test_ece"} <= set(
        metrics
    )
    assert 0.85 < metrics["test_set_coverage"] < 0.96
    assert 1.0 < metrics["test_set_size"] < 3.0
    (batch,) = quiet_trainer().predict(conformal, dm.test_dataloader())
    assert batch["pred_set"].dtype == torch.bool and batch["pred_set"].shape == (479, 10)
    # the same threshold as calibrate() on the same data and draws
    seed_everything(0)
    direct = ConformalClassification(method, alpha=0.1, score="raps").calibrate(dm, split="calib")
    torch.testing.assert_close(direct.threshold, conformal.threshold)


def two_moons_arrays():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(160, 2, generator=gen)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return ArrayDataModule(
        x[:64], y[:64], x[64:96], y[64:96], x[128:], y[128:], batch_size=32,
        X_calib=x[96:128], y_calib=y[96:128],
    )  # fmt: skip


METHODS = {
    "deterministic": lambda: DeterministicClassification(MLP(2, [8], 2)),
    "mc_dropout": lambda: MCDropoutClassification(
        MLP(2, [8], 2, dropout_p=0.2), num_mc_samples_test=4
    ),
    "deep_ensemble": lambda: DeepEnsembleClassification(MLP(2, [8], 2), num_members=2),
    "bnn_vi": lambda: BNNVIClassification(MLP(2, [8], 2), num_mc_samples_test=4),
    "swag": lambda: SWAGClassification(
        MLP(2, [8], 2), max_num_samples=3, num_mc_samples_test=4, burnin_epochs=1
    ),
    "temperature_scaled": lambda: TemperatureScaling(DeterministicClassification(MLP(2, [8], 2))),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_classification_method(name):
    """From the mean predictive probabilities of any method, post-hoc ones included."""
    seed_everything(0)
    dm = two_moons_arrays()
    method = METHODS[name]()
    if isinstance(method, TemperatureScaling):
        quiet_trainer(max_epochs=3).fit(method.model, dm)
        method.calibrate(dm)
    else:
        quiet_trainer(max_epochs=3).fit(method, dm)
    conformal = ConformalClassification(method, alpha=0.2).calibrate(dm)  # the val split
    preds = conformal.predict_step(dm.X_test)
    assert preds["pred_set"].shape == (32, 2) and preds["pred_set"].dtype == torch.bool
    torch.testing.assert_close(preds["pred"].sum(1), torch.ones(32))
    (metrics,) = quiet_trainer().test(conformal, dm, verbose=False)
    assert 0.0 <= metrics["test_set_coverage"] <= 1.0


@pytest.mark.parametrize("mondrian", [False, True])
def test_checkpoint_round_trip(tmp_path, mondrian):
    seed_everything(0)
    dm = two_moons_arrays()
    fitted = DeterministicClassification(MLP(2, [8], 2))
    quiet_trainer(max_epochs=2).fit(fitted, dm)
    conformal = ConformalClassification(
        fitted, alpha=0.25, score="raps", lam=0.05, mondrian=mondrian
    )
    calibration_trainer = quiet_trainer()
    calibration_trainer.validate(conformal, dataloaders=dm.calib_dataloader(), verbose=False)
    calibration_trainer.save_checkpoint(tmp_path / "conformal.ckpt")
    loaded = ConformalClassification.load_from_checkpoint(
        tmp_path / "conformal.ckpt",
        model=DeterministicClassification(MLP(2, [8], 2)),
        weights_only=True,
    )
    assert loaded.is_calibrated
    assert (loaded.score, loaded.lam, loaded.mondrian) == ("raps", 0.05, mondrian)
    assert loaded.threshold.shape == ((2,) if mondrian else (1,))
    assert torch.equal(loaded.threshold, conformal.threshold)
    assert torch.equal(loaded.num_calibration_points, conformal.num_calibration_points)
    torch.manual_seed(1)
    expected = conformal.predict_step(dm.X_test)
    torch.manual_seed(1)
    got = loaded.predict_step(dm.X_test)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


# -- 4. errors -----------------------------------------------------------------------------------
def test_minimum_calibration_points():
    for alpha in (0.1, 0.05, 0.2, 0.3, 0.01, 0.5, 0.9, 0.07):
        n = minimum_calibration_points(alpha)
        assert conformal_rank(n, alpha) <= n and (n == 1 or conformal_rank(n - 1, alpha) > n - 1)
    assert minimum_calibration_points(0.1) == 9 and minimum_calibration_points(0.05) == 19


def test_errors_name_the_argument(digits):
    method, x, y, _ = digits
    conformal = ConformalClassification(method, alpha=0.1)
    # the calibration split: missing, or too small for alpha (marginal and per class)
    no_val = DigitsDatamodule(flatten=True, val_fraction=0.0)
    with pytest.raises(ValueError, match=r"no 'val' split; it has \['train', 'test'\].*`split`"):
        conformal.calibrate(no_val)
    with pytest.raises(ValueError, match=r"no 'calib' split; it has \['train', 'test'\]"):
        conformal.calibrate(no_val, split="calib")
    with pytest.raises(
        ValueError, match=r"8 calibration points are too few for `alpha`=0.1.*at least 9"
    ):
        conformal.calibrate((x[:8], y[:8]))
    conformal.calibrate((x[:9], y[:9]))  # 9 are enough
    mondrian = ConformalClassification(method, alpha=0.1, mondrian=True)
    with pytest.raises(
        ValueError,
        match=r"`mondrian`=True.*at least 9 calibration points of every class.*class \d: \d",
    ):
        mondrian.calibrate((x[:100], y[:100]))
    # probabilities that do not sum to one, or are not probabilities
    with pytest.raises(ValueError, match=r"`probs` rows must sum to 1.*row 1 sums to 1.5"):
        prediction_sets(torch.tensor([[0.5, 0.5], [0.75, 0.75]]), 0.5)
    with pytest.raises(ValueError, match=r"`probs` must be probabilities in \[0, 1\].*not logits"):
        class_scores(torch.tensor([[2.0, -1.0]]))
    with pytest.raises(ValueError, match=r"`probs` must be class probabilities of shape \[N, C\]"):
        label_scores(torch.tensor([0.5, 0.5]), torch.tensor([0]))
    # arguments
    for bad in (0, 1, -0.1, True, "0.1", math.nan):
        with pytest.raises(ValueError, match="`alpha`"):
            ConformalClassification(method, alpha=bad)
    with pytest.raises(ValueError, match="`score` must be one of"):
        ConformalClassification(method, score="thr")
    with pytest.raises(ValueError, match="`k_reg` must be a non-negative integer"):
        ConformalClassification(method, k_reg=-1)
    with pytest.raises(ValueError, match="`lam` must be a non-negative finite number"):
        ConformalClassification(method, lam=math.inf)
    with pytest.raises(ValueError, match="`randomized` must be True or False"):
        ConformalClassification(method, randomized="yes")
    with pytest.raises(TypeError, match="`model` must be a fitted classification method"):
        ConformalClassification(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"`u` must have shape \[N\] = \[2\]"):
        class_scores(torch.tensor([[0.5, 0.5], [0.2, 0.8]]), "aps", u=torch.rand(3))
    with pytest.raises(ValueError, match=r"`threshold` must be a number or \[C\] = \[2\]"):
        prediction_sets(torch.tensor([[0.5, 0.5]]), torch.rand(3))
    # predicting before calibrating, and training a post-hoc wrapper
    fresh = ConformalClassification(method)
    with pytest.raises(RuntimeError, match="not calibrated.*calibrate"):
        fresh.predict_step(x[:3])
    with pytest.raises(RuntimeError, match="nothing to train"):
        quiet_trainer(max_epochs=1).fit(fresh, no_val)
    # labels out of range
    with pytest.raises(ValueError, match="class index 10"):
        fresh.calibrate((x[:20], torch.full((20,), 10)))
