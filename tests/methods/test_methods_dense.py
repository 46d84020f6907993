"""Dense prediction: segmentation and pixel-wise regression (uq_box.methods.dense)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning import Trainer, seed_everything
from torch import nn
from torchmetrics.classification import MulticlassJaccardIndex

from uq_box.datamodules import ToyPixelRegressionDatamodule, ToySegmentationDatamodule
from uq_box.losses import NLL
from uq_box.methods import dense
from uq_box.methods.predictive import regression_predictive
from uq_box.methods.predictive_classification import classification_predictive
from uq_box.methods.predictive_dense import (
    PixelRegressionMoments,
    SegmentationMoments,
    pixel_regression_predictive,
    segmentation_predictive,
)
from uq_box.metrics import ExpectedCalibrationError
from uq_box.metrics.dense import (
    MeanIoU,
    PixelAccuracy,
    PixelECE,
    PixelGaussianNLL,
    PixelNLL,
    Sparsification,
    UncertaintyErrorAUROC,
    dense_confusion_matrix,
    sparsification_curve,
)
from uq_box.models import UNet

F64 = {"dtype": torch.float64}


def entropy(p, dim):
    return -(p * p.clamp_min(1e-300).log()).sum(dim)


# -- the pure predictives -------------------------------------------------------------------------
def test_segmentation_predictive_entropy_split_per_pixel():
    torch.manual_seed(0)
    logits = 3 * torch.randn(5, 2, 4, 6, 7, **F64)  # [S, N, C, H, W]
    preds = segmentation_predictive(logits)
    assert preds["pred"].shape == (2, 4, 6, 7)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (2, 6, 7)
    probs = logits.softmax(2)
    torch.testing.assert_close(preds["pred"], probs.mean(0))
    torch.testing.assert_close(preds["pred_uct"], entropy(probs.mean(0), 1))
    torch.testing.assert_close(preds["aleatoric_uct"], entropy(probs, 2).mean(0))
    torch.testing.assert_close(
        preds["pred_uct"], preds["aleatoric_uct"] + preds["epistemic_uct"], atol=1e-12, rtol=0
    )
    # one pixel is the point-wise predictive of its logits
    point = classification_predictive(logits[:, :, :, 3, 4])
    torch.testing.assert_close(preds["epistemic_uct"][:, 3, 4], point["epistemic_uct"])


def test_pixel_regression_predictive_is_the_mixture_per_pixel():
    torch.manual_seed(0)
    outputs = torch.randn(6, 2, 4, 5, 3, **F64)  # 2 targets x (mean, scale)
    preds = pixel_regression_predictive(outputs, NLL())
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (2, 2, 5, 3)
    assert preds["samples"].shape == (6, 2, 2, 5, 3)
    point = regression_predictive(outputs[:, :, :, 1, 2], NLL())
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
        torch.testing.assert_close(preds[key][:, :, 1, 2], point[key])
    torch.testing.assert_close(
        preds["pred_uct"] ** 2, preds["aleatoric_uct"] ** 2 + preds["epistemic_uct"] ** 2
    )


@pytest.mark.parametrize("chunk", [1, 3, 7, 10])
def test_chunked_reductions_equal_the_unchunked_ones(chunk):
    torch.manual_seed(1)
    logits = 4 * torch.randn(7, 3, 4, 5, 6, **F64)
    whole = segmentation_predictive(logits)
    moments = SegmentationMoments()
    for part in logits.split(chunk):
        moments.add(part)
    for key, value in moments.result().items():
        torch.testing.assert_close(value, whole[key], atol=1e-6, rtol=0)
    outputs = torch.randn(7, 3, 2, 5, 6, **F64) + 5.0
    whole = pixel_regression_predictive(outputs, NLL())
    moments = PixelRegressionMoments(NLL())
    for part in outputs.split(chunk):
        moments.add(part)
    result = moments.result()
    assert set(result) == {"pred", "pred_uct", "aleatoric_uct", "epistemic_uct"}
    for key, value in result.items():
        torch.testing.assert_close(value, whole[key], atol=1e-6, rtol=0)


# -- the methods ----------------------------------------------------------------------------------
def _unet(out_channels, dropout_p=0.0):
    return UNet(1, out_channels, depth=1, width=4, dropout_p=dropout_p)


def _seg_data():
    return ToySegmentationDatamodule(
        n_train=16, n_val=4, n_test=4, image_size=16, batch_size=8, unlabeled_fraction=0.1
    )


def _reg_data():
    return ToyPixelRegressionDatamodule(n_train=16, n_val=4, n_test=4, image_size=16, batch_size=8)


SEG = [
    (dense.DeterministicSegmentation, {}, False),
    (dense.MCDropoutSegmentation, {"num_mc_samples_test": 5}, True),
    (dense.DeepEnsembleSegmentation, {"num_members": 3}, True),
    (
        dense.BNNVISegmentation,
        {"stochastic_module_names": ["bottleneck.0"], "num_mc_samples_train": 2},
        True,
    ),
    (dense.SWAGSegmentation, {"num_mc_samples_test": 5, "max_num_samples": 2}, True),
    (dense.SGMCMCSegmentation, {"max_num_samples": 4, "stochastic_module_names": [-1]}, True),
]
REG = [
    (getattr(dense, c.__name__.replace("Segmentation", "PixelRegression")), k, d) for c, k, d in SEG
]


def _fit(cls, kwargs, dropout, width, data, epochs=2):
    seed_everything(0)
    method = cls(_unet(width, 0.2 if dropout else 0.0), **kwargs)
    if cls in (dense.SWAGSegmentation, dense.SWAGPixelRegression):
        method.optimizer = lambda p: torch.optim.Adam(p, lr=1e-2)
    Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(method, data)
    return method


@pytest.mark.parametrize(
    ("cls", "kwargs", "stochastic"), SEG, ids=lambda v: getattr(v, "__name__", "")
)
def test_segmentation_contract_and_chunks(cls, kwargs, stochastic):
    data = _seg_data()
    method = _fit(cls, kwargs, cls is dense.MCDropoutSegmentation, 3, data)
    x = data.X_test
    torch.manual_seed(0)
    preds = method.predict_step(x)
    assert preds["pred"].shape == (4, 3, 16, 16)
    for key in ("pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (4, 16, 16), key
    assert preds["logits"].shape[1:] == (4, 3, 16, 16)
    torch.testing.assert_close(preds["pred"].sum(1), torch.ones(4, 16, 16))
    assert (preds["epistemic_uct"] > 0).any() == stochastic
    method.sample_chunk_size = 2
    torch.manual_seed(0)
    chunked = method.predict_step(x)
    assert "logits" not in chunked
    if cls is not dense.MCDropoutSegmentation and cls is not dense.BNNVISegmentation:
        # the same samples (members, parameter vectors) in chunks: the same numbers
        for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
            torch.testing.assert_close(chunked[key], preds[key], atol=1e-5, rtol=1e-5)
    else:
        assert chunked["pred"].shape == preds["pred"].shape
    method.sample_chunk_size = None


@pytest.mark.parametrize(
    ("cls", "kwargs", "stochastic"), REG, ids=lambda v: getattr(v, "__name__", "")
)
def test_pixel_regression_contract_and_chunks(cls, kwargs, stochastic):
    data = _reg_data()
    method = _fit(cls, kwargs, cls is dense.MCDropoutPixelRegression, 2, data)
    x = data.X_test
    torch.manual_seed(0)
    preds = method.predict_step(x)
    for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
        assert preds[key].shape == (4, 1, 16, 16), key
    assert preds["samples"].shape[1:] == (4, 1, 16, 16)
    assert (preds["epistemic_uct"] > 0).any() == stochastic
    method.sample_chunk_size = 3
    torch.manual_seed(0)
    chunked = method.predict_step(x)
    assert "samples" not in chunked
    if cls is dense.DeepEnsemblePixelRegression or cls is dense.SWAGPixelRegression:
        for key in ("pred", "pred_uct", "aleatoric_uct", "epistemic_uct"):
            torch.testing.assert_close(chunked[key], preds[key], atol=1e-5, rtol=1e-5)


def test_chunked_method_prediction_equals_unchunked_in_float64():
    seed_everything(0)
    method = dense.DeepEnsembleSegmentation(_unet(3), num_members=5).double()
    x = torch.randn(2, 1, 8, 8, **F64)
    whole = method.predict_step(x)
    for chunk in (1, 2, 4):
        method.sample_chunk_size = chunk
        for key, value in method.predict_step(x).items():
            torch.testing.assert_close(value, whole[key], atol=1e-6, rtol=0)


def test_ignore_index_is_left_out_of_loss_and_metrics():
    torch.manual_seed(0)
    method = dense.DeterministicSegmentation(_unet(3))
    logits = torch.randn(1, 2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, :2] = -100
    labeled = target != -100
    loss = method.data_loss(logits, target)
    expected = nn.functional.cross_entropy(
        logits[0].movedim(1, -1)[labeled], target[labeled], reduction="mean"
    )
    torch.testing.assert_close(loss, expected)
    changed = logits.clone()
    changed[0, 0, :, :2] += 10.0  # only unlabeled pixels change
    torch.testing.assert_close(method.data_loss(changed, target), loss)
    probs = logits[0].softmax(1)
    for metric in (PixelAccuracy(), PixelNLL(), PixelECE(), MeanIoU()):
        a, b = metric.clone(), metric.clone()
        a.update(probs, target)
        b.update(changed[0].softmax(1), target)
        torch.testing.assert_close(a.compute(), b.compute())
    accuracy = PixelAccuracy()
    accuracy.update(probs, target)
    manual = (probs.argmax(1) == target)[labeled].float().mean()
    torch.testing.assert_close(accuracy.compute(), manual)


# -- metrics --------------------------------------------------------------------------------------
def test_mean_iou_against_a_hand_computed_confusion_matrix_and_torchmetrics():
    pred = torch.tensor([[[0, 0, 1], [1, 2, 2]]])
    target = torch.tensor([[[0, 1, 1], [1, 2, -100]]])
    confusion = dense_confusion_matrix(pred, target, 3)
    assert confusion.tolist() == [[1, 0, 0], [1, 2, 0], [0, 0, 1]]
    # IoU: class 0: 1 / (1 + 1) ; class 1: 2 / (2 + 1) ; class 2: 1 / 1
    metric = MeanIoU(num_classes=3)
    metric.update(pred, target)
    assert metric.compute().item() == pytest.approx((0.5 + 2 / 3 + 1) / 3)
    torch.manual_seed(0)
    probs = torch.randn(4, 5, 8, 8).softmax(1)
    labels = torch.randint(0, 5, (4, 8, 8))
    labels[:, 0] = -100
    ours = MeanIoU()
    ours.update(probs, labels)
    reference = MulticlassJaccardIndex(num_classes=5, ignore_index=-100, average="macro")
    reference.update(probs.argmax(1), labels)
    torch.testing.assert_close(ours.compute(), reference.compute())


def test_pixel_ece_is_the_ece_of_the_flattened_pixels():
    torch.manual_seed(0)
    probs = (2 * torch.randn(3, 4, 6, 5)).softmax(1)
    target = torch.randint(0, 4, (3, 6, 5))
    target[1, 2:] = -100
    ours = PixelECE(num_bins=10)
    ours.update(probs, target)
    flat_probs = probs.movedim(1, -1).reshape(-1, 4)
    flat_target = target.reshape(-1)
    keep = flat_target != -100
    reference = ExpectedCalibrationError(num_bins=10)
    reference.update(flat_probs[keep], flat_target[keep])
    torch.testing.assert_close(ours.compute(), reference.compute())


def test_ause_is_zero_for_an_oracle_and_positive_otherwise():
    torch.manual_seed(0)
    error = torch.rand(1000)
    oracle = sparsification_curve(error, error, num_fractions=10)
    assert oracle["ause"].item() == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(oracle["curve"], oracle["oracle"])
    # the oracle curve falls: the largest errors go first
    assert (oracle["oracle"].diff() <= 0).all()
    reversed_ = sparsification_curve(-error, error, num_fractions=10)
    assert reversed_["ause"].item() > 0.2
    metric = Sparsification(num_fractions=10)
    metric.update(error.reshape(10, 10, 10), error.reshape(10, 10, 10))
    assert metric.compute().item() == pytest.approx(0.0, abs=1e-6)
    auroc = UncertaintyErrorAUROC()
    auroc.update(error, (error > 0.5).float())
    assert auroc.compute().item() == pytest.approx(1.0)
    nll = PixelGaussianNLL()
    nll.update(torch.zeros(2, 1, 3, 3), torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3))
    assert nll.compute().item() == pytest.approx(0.5 * math.log(2 * math.pi))


# -- the toy data: aleatoric uncertainty on the boundaries ---------------------------------------
def test_aleatoric_uncertainty_is_higher_on_boundaries_after_a_short_fit():
    seed_everything(0)
    data = ToySegmentationDatamodule(
        n_train=64, n_val=8, n_test=16, image_size=24, batch_size=16, boundary_width=1.0
    )
    method = dense.DeterministicSegmentation(
        UNet(1, 3, depth=1, width=8), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    Trainer(
        max_epochs=30,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(method, data)
    preds = method.predict_step(data.X_test)
    boundary = data.boundary_mask_test
    aleatoric = preds["aleatoric_uct"]
    interior = ~boundary
    assert aleatoric[boundary].mean() > 2 * aleatoric[interior].mean()
    accuracy = (preds["pred"].argmax(1) == data.Y_test)[interior].float().mean()
    assert accuracy > 0.8


def test_unet_shapes_and_errors():
    for upsampling in ("transpose", "bilinear"):
        net = UNet(2, 5, depth=2, width=4, upsampling=upsampling, dropout_p=0.1)
        assert net(torch.randn(3, 2, 16, 12)).shape == (3, 5, 16, 12)
    with pytest.raises(ValueError, match="`upsampling`"):
        UNet(upsampling="nearest")
    with pytest.raises(ValueError, match="`dropout_at`"):
        UNet(dropout_at="encoder")


def test_wrong_network_outputs_are_refused():
    method = dense.DeterministicPixelRegression(_unet(3))
    with pytest.raises(ValueError, match="`out_channels`"):
        method.data_loss(torch.randn(1, 2, 3, 4, 4), torch.randn(2, 1, 4, 4))
    seg = dense.DeterministicSegmentation(_unet(2))
    with pytest.raises(ValueError, match="class index 2"):
        seg.data_loss(torch.randn(1, 2, 2, 4, 4), torch.full((2, 4, 4), 2))
    with pytest.raises(ValueError, match="image-to-image"):
        seg.predictive(torch.randn(1, 2, 3))
