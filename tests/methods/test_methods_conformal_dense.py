"""Conformal risk control for dense tasks (``uq_box.methods.conformal_dense``).

The guarantee is checked with numbers: over many random calibration/test splits of a fixed pool
of precomputed predictions (synthetic probabilities and residuals, with an image-level effect so
that the pixels of one image are dependent), the mean per-image risk stays at most ``alpha``. A
random split of a fixed pool makes the calibration and test images exchangeable, so the
theorem holds conditionally on the pool: ``E[risk] <= alpha`` exactly, and also ``E[risk] >=
alpha - 2 / (n + 1)`` (continuous scores). The Monte Carlo tolerance is 4 standard errors of
the mean over the splits (estimated from the splits; the splits are independent draws).
"""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Trainer

from uq_box.datamodules import ToyPixelRegressionDatamodule, ToySegmentationDatamodule
from uq_box.methods import (
    ConformalPixelRegression,
    ConformalSegmentation,
    DeepEnsemblePixelRegression,
    DeepEnsembleSegmentation,
)
from uq_box.methods.conformal_dense import (
    minimum_calibration_images,
    pixel_false_negative_rate,
    pixel_miscoverage,
    risk_control_index,
    risk_control_threshold,
    segmentation_prediction_sets,
    segmentation_scores,
)
from uq_box.models import UNet

ALPHA = 0.1
NUM_SPLITS = 300
NUM_CALIB = 40


def _pool_segmentation(n: int = 240, size: int = 8, classes: int = 3, seed: int = 0):
    """Overconfident probabilities ``[n, C, H, W]`` and labels drawn from the true ones; each
    image has its own difficulty (a temperature), so its pixels' errors are dependent."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, classes, size, size, generator=g)
    logits = logits + torch.randn(n, classes, 1, 1, generator=g)  # image-level class offsets
    temperature = 0.3 + 1.5 * torch.rand(n, 1, 1, 1, generator=g)
    true = (logits * temperature).softmax(1)
    labels = torch.multinomial(true.movedim(1, -1).reshape(-1, classes), 1, generator=g)
    labels = labels.reshape(n, size, size)
    labels[:, 0, :2] = -100  # some unlabeled pixels
    return (1.5 * logits).softmax(1), labels


def _pool_regression(n: int = 240, size: int = 8, seed: int = 1):
    """Normalized residuals ``|y - pred| / pred_uct`` ``[n, H * W]``: heavy-tailed noise whose
    scale is off by an image-level factor."""
    g = torch.Generator().manual_seed(seed)
    scale = 0.5 + 1.5 * torch.rand(n, 1, generator=g)
    noise = torch.distributions.StudentT(4.0).sample((n, size * size))
    return (scale * noise).abs()


def _tail_risk(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Per-image fraction of labeled pixels with ``score > threshold`` (NaN skipped)."""
    labeled = ~scores.isnan()
    above = (scores.nan_to_num(-math.inf) > threshold) & labeled
    return above.sum(1).double() / labeled.sum(1).clamp_min(1).double()


def _split_risks(scores: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Mean test risk of ``NUM_SPLITS`` random calibration/test splits of the pool."""
    g = torch.Generator().manual_seed(seed)
    risks = []
    for _ in range(NUM_SPLITS):
        order = torch.randperm(scores.shape[0], generator=g)
        calib, test = scores[order[:NUM_CALIB]], scores[order[NUM_CALIB:]]
        threshold = risk_control_threshold(calib, ALPHA)
        risks.append(_tail_risk(test.double(), threshold).mean())
    return torch.stack(risks)


def _assert_controlled(risks: torch.Tensor) -> None:
    mean, tolerance = risks.mean().item(), 4 * risks.std().item() / math.sqrt(len(risks))
    assert mean <= ALPHA + tolerance, (mean, tolerance)
    assert mean >= ALPHA - 2 / (NUM_CALIB + 1) - tolerance, (mean, tolerance)


def test_exact_threshold_is_the_grid_rule_on_every_score():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(30, 20, generator=g).round(decimals=2)  # ties
    scores[torch.rand(30, 20, generator=g) < 0.2] = math.nan
    scores[3] = math.nan  # an image without labeled pixels: loss 0
    threshold = risk_control_threshold(scores, ALPHA)
    grid = scores[~scores.isnan()].unique()
    losses = torch.stack([_tail_risk(scores.double(), v) for v in grid], dim=1)
    index = risk_control_index(losses, ALPHA)
    assert threshold.item() == grid[index].item()
    # the rule holds at lambda_hat and fails just below it
    n = scores.shape[0]
    assert n / (n + 1) * losses[:, index].mean() + 1 / (n + 1) <= ALPHA
    assert n / (n + 1) * losses[:, index - 1].mean() + 1 / (n + 1) > ALPHA


def test_segmentation_false_negative_rate_is_controlled_over_random_splits():
    probs, labels = _pool_segmentation()
    scores = segmentation_scores(probs, labels)
    # the sets of the wrapper lose what the scores say
    threshold = risk_control_threshold(scores[:NUM_CALIB], ALPHA)
    sets = segmentation_prediction_sets(probs, threshold)
    fnr = pixel_false_negative_rate(sets, labels)
    torch.testing.assert_close(fnr, _tail_risk(scores.double(), threshold))
    risks = _split_risks(scores)
    _assert_controlled(risks)
    # an uncalibrated rule (the argmax class only) misses far more than alpha
    argmax = torch.nn.functional.one_hot(probs.argmax(1), 3).movedim(-1, 1).bool()
    assert pixel_false_negative_rate(argmax, labels).mean() > 2 * ALPHA


def test_pixel_regression_coverage_is_controlled_over_random_splits():
    scores = _pool_regression()
    risks = _split_risks(scores, seed=1)
    _assert_controlled(risks)
    coverage = 1 - risks.mean().item()
    assert coverage >= 1 - ALPHA - 4 * risks.std().item() / math.sqrt(NUM_SPLITS)
    # the intervals of pixel_miscoverage agree with the scores: y = |score| * uct, pred = 0
    uct = torch.rand(scores.shape) + 0.5
    target = (scores * uct).reshape(-1, 1, 8, 8)
    threshold = risk_control_threshold(scores[:NUM_CALIB], ALPHA).float()
    half = (threshold * uct).reshape(-1, 1, 8, 8)
    miss = pixel_miscoverage(-half, half, target)[:, 0]
    torch.testing.assert_close(miss, _tail_risk(scores.double(), threshold.double()))


@pytest.fixture(scope="module")
def segmentation():
    torch.manual_seed(0)
    dm = ToySegmentationDatamodule(n_train=8, n_val=24, n_test=8, image_size=8, eval_batch_size=8)
    return dm, DeepEnsembleSegmentation(UNet(1, 3, depth=1, width=4), num_members=3)


@pytest.fixture(scope="module")
def pixel_regression():
    torch.manual_seed(0)
    dm = ToyPixelRegressionDatamodule(
        n_train=8, n_val=24, n_test=8, image_size=8, eval_batch_size=8
    )
    return dm, DeepEnsemblePixelRegression(UNet(1, 2, depth=1, width=4), num_members=3)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1, "0.1"])
def test_bad_alpha_is_an_error_naming_it(alpha, segmentation, pixel_regression):
    for wrapper, (_, model) in (
        (ConformalSegmentation, segmentation),
        (ConformalPixelRegression, pixel_regression),
    ):
        with pytest.raises(ValueError, match="`alpha`"):
            wrapper(model, alpha=alpha)


def test_too_few_calibration_images_is_an_error(segmentation, pixel_regression):
    assert minimum_calibration_images(0.1) == 9
    assert minimum_calibration_images(0.05) == 19
    for wrapper, (dm, model) in (
        (ConformalSegmentation, segmentation),
        (ConformalPixelRegression, pixel_regression),
    ):
        with pytest.raises(ValueError, match=r"24 calibration images .* `alpha`=0.03.* 33"):
            wrapper(model, alpha=0.03).calibrate(dm)
        with pytest.raises(RuntimeError, match="not calibrated"):
            wrapper(model).predict_step(dm.X_test)


def test_wrong_task_is_an_error(segmentation, pixel_regression):
    with pytest.raises(TypeError, match="`model` must be a fitted segmentation method"):
        ConformalSegmentation(pixel_regression[1])
    with pytest.raises(TypeError, match="`model` must be a fitted pixel regression method"):
        ConformalPixelRegression(segmentation[1])


def test_chunked_prediction_gives_the_same_sets_and_intervals(segmentation, pixel_regression):
    dm, model = segmentation
    wrapper = ConformalSegmentation(model, alpha=0.2).calibrate(dm)
    full = wrapper.predict_step(dm.X_test)
    assert full["pred_set"].shape == (8, 3, 8, 8) and full["pred_set"].dtype == torch.bool
    wrapper.sample_chunk_size = 2
    try:
        assert model.sample_chunk_size == 2
        chunked = wrapper.predict_step(dm.X_test)
    finally:
        wrapper.sample_chunk_size = None
    assert torch.equal(chunked["pred_set"], full["pred_set"])
    assert "logits" not in chunked

    dm, model = pixel_regression
    wrapper = ConformalPixelRegression(model, alpha=0.2).calibrate(dm)
    full = wrapper.predict_step(dm.X_test)
    assert full["lower"].shape == full["upper"].shape == (8, 1, 8, 8)
    assert (full["lower"] < full["pred"]).all() and (full["pred"] < full["upper"]).all()
    torch.testing.assert_close(
        full["pred_uct"] ** 2, full["aleatoric_uct"] ** 2 + full["epistemic_uct"] ** 2
    )
    model.sample_chunk_size = 2
    try:
        chunked = wrapper.predict_step(dm.X_test)
    finally:
        model.sample_chunk_size = None
    for key in ("lower", "upper", "pred_uct"):
        torch.testing.assert_close(chunked[key], full[key], msg=key)


def test_validate_calibrates_and_test_logs_the_risk(segmentation, pixel_regression):
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    dm, model = segmentation
    wrapper = ConformalSegmentation(model, alpha=0.2)
    (logged,) = Trainer(**quiet).validate(wrapper, dm, verbose=False)
    assert logged["calibration_images"] == 24
    assert logged["risk_threshold"] == pytest.approx(
        wrapper.calibrate(dm).threshold.item(), rel=1e-6
    )
    (tested,) = Trainer(**quiet).test(wrapper, dm, verbose=False)
    assert 0 <= tested["test_fnr"] <= 1 and 1 <= tested["test_set_size"] <= 3
    assert "test_miou" in tested

    dm, model = pixel_regression
    wrapper = ConformalPixelRegression(model, alpha=0.2)
    Trainer(**quiet).validate(wrapper, dm, verbose=False)
    (tested,) = Trainer(**quiet).test(wrapper, dm, verbose=False)
    assert 0 <= tested["test_coverage"] <= 1 and tested["test_interval_width"] > 0
