import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score, roc_curve
from torchmetrics.functional.classification import multiclass_calibration_error

from uq_box.metrics import functional_classification as fc
from uq_box.metrics.classification import (
    BrierScore,
    ExpectedCalibrationError,
    MulticlassNLL,
    OODDetection,
)

N, C = 301, 5
SIZES = [1, 64, 7, 150, 79]  # uneven batches summing to N


def _data(n: int = N, c: int = C, seed: int = 0, dtype=torch.float64):
    """Softmax probabilities with labels that agree with the argmax about 60% of the time."""
    gen = torch.Generator().manual_seed(seed)
    probs = (2.0 * torch.randn(n, c, generator=gen, dtype=dtype)).softmax(-1)
    noise = torch.randint(0, c, (n,), generator=gen)
    target = torch.where(torch.rand(n, generator=gen) < 0.5, probs.argmax(-1), noise)
    return probs, target


def test_nll_matches_sklearn_log_loss():
    probs, target = _data()
    expected = log_loss(target.numpy(), probs.numpy(), labels=list(range(C)))
    assert fc.multiclass_nll(probs, target).item() == pytest.approx(expected, rel=1e-12)


def test_nll_clamps_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    value = fc.multiclass_nll(probs, torch.tensor([1, 0]))
    tiny = torch.finfo(torch.float32).tiny
    assert torch.isfinite(value)
    assert value.item() == pytest.approx((-np.log(tiny) + np.log(2.0)) / 2, rel=1e-6)


def test_brier_matches_numpy():
    probs, target = _data()
    p = probs.numpy()
    onehot = np.eye(C)[target.numpy()]
    expected = np.mean(np.sum((p - onehot) ** 2, axis=1))
    assert fc.brier_score(probs, target).item() == pytest.approx(expected, rel=1e-12)
    perfect = torch.eye(3)
    assert fc.brier_score(perfect, torch.arange(3)).item() == 0.0
    assert fc.brier_score(perfect, torch.tensor([1, 2, 0])).item() == 2.0


@pytest.mark.parametrize(("num_bins", "seed"), [(15, 0), (10, 1), (1, 2), (30, 3)])
def test_ece_matches_torchmetrics(num_bins, seed):
    probs, target = _data(seed=seed, dtype=torch.float32)
    expected = multiclass_calibration_error(
        probs, target, num_classes=C, n_bins=num_bins, norm="l1"
    )
    value = fc.expected_calibration_error(probs, target, num_bins=num_bins)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)


def test_ece_bins_are_closed_on_the_right():
    # Confidence exactly 1 joins the top bin (Guo et al.), torchmetrics gives it a bin of its own.
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [0.5, 0.3, 0.2]])
    target = torch.tensor([0, 1, 0])
    # Bin (0.9, 1]: confidences 1.0 and 0.95, accuracy 1/2; bin (0.4, 0.5]: 0.5 (on the edge).
    expected = (2 * abs(0.975 - 0.5) + abs(0.5 - 1.0)) / 3
    value = fc.expected_calibration_error(probs, target, num_bins=10)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_reliability_diagram():
    probs, target = _data(seed=4)
    conf, acc, count = fc.reliability_diagram(probs, target, num_bins=10)
    assert conf.shape == acc.shape == count.shape == (10,)
    assert count.dtype == torch.long and count.sum().item() == N
    # Recompute by hand with (lower, upper] bins.
    top, pred = probs.max(1)
    correct = (pred == target).double()
    edges = np.linspace(0, 1, 11)
    for b in range(10):
        mask = torch.from_numpy((top.numpy() > edges[b]) & (top.numpy() <= edges[b + 1]))
        assert count[b].item() == int(mask.sum())
        if mask.any():
            assert conf[b].item() == pytest.approx(top[mask].mean().item(), rel=1e-12)
            assert acc[b].item() == pytest.approx(correct[mask].mean().item(), rel=1e-12)
        else:
            assert conf[b].item() == 0.0 and acc[b].item() == 0.0
    ece = (count.double() * (acc - conf).abs()).sum() / N
    torch.testing.assert_close(ece, fc.expected_calibration_error(probs, target, num_bins=10))


def _ood_scores(seed: int, ties: bool):
    rng = np.random.default_rng(seed)
    u_in = rng.normal(0.0, 1.0, 200)
    u_out = rng.normal(1.0, 1.0, 57)
    if ties:  # few distinct values: many ties within and across groups
        u_in, u_out = np.round(u_in * 2) / 2, np.round(u_out * 2) / 2
    return u_in, u_out


def _sklearn_labels(u_in, u_out):
    return np.r_[np.zeros(len(u_in)), np.ones(len(u_out))], np.r_[u_in, u_out]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_auroc_matches_sklearn(seed, ties):
    u_in, u_out = _ood_scores(seed, ties)
    labels, scores = _sklearn_labels(u_in, u_out)
    value = fc.ood_auroc(torch.from_numpy(u_in), torch.from_numpy(u_out))
    assert value.item() == pytest.approx(roc_auc_score(labels, scores), rel=1e-12)
    # float32 inputs with ties to the same score too.
    value32 = fc.ood_auroc(torch.from_numpy(u_in).float(), torch.from_numpy(u_out).float())
    labels32, scores32 = _sklearn_labels(u_in.astype(np.float32), u_out.astype(np.float32))
    assert value32.item() == pytest.approx(roc_auc_score(labels32, scores32), rel=1e-12)


def test_ood_auroc_edge_cases():
    assert fc.ood_auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])).item() == 1.0
    assert fc.ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 0.0
    assert fc.ood_auroc(torch.ones(4), torch.ones(3)).item() == 0.5
    # Integer scores and extra dimensions are flattened.
    assert fc.ood_auroc(torch.tensor([[0, 1]]), torch.tensor([[1], [2]])).item() == pytest.approx(
        roc_auc_score([0, 0, 1, 1], [0, 1, 1, 2])
    )


def _reference_fpr95(u_in, u_out, level=0.95):
    labels, scores = _sklearn_labels(u_in, u_out)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return fpr[np.searchsorted(tpr, level, side="left")]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fpr95_matches_roc_curve(seed, ties):
    u_in, u_out = _ood_scores(seed, ties)
    value = fc.fpr_at_95_tpr(torch.from_numpy(u_in), torch.from_numpy(u_out))
    assert value.item() == pytest.approx(_reference_fpr95(u_in, u_out), abs=1e-15)
    # Direct definition: the highest threshold flagging >= 95% of OOD; FPR of in-dist. there.
    thresholds = np.sort(np.unique(np.r_[u_in, u_out]))[::-1]
    t = next(t for t in thresholds if np.mean(u_out >= t) >= 0.95)
    assert value.item() == pytest.approx(np.mean(u_in >= t), abs=1e-15)
    level = fc.fpr_at_95_tpr(torch.from_numpy(u_in), torch.from_numpy(u_out), tpr_level=0.5)
    assert level.item() == pytest.approx(_reference_fpr95(u_in, u_out, 0.5), abs=1e-15)


def test_fpr95_exact_level():
    # 20 OOD scores 1..20, in-dist. scores 0.5 .. 19.5: 95% TPR means flag 19 of 20 (t = 2).
    u_out = torch.arange(1.0, 21.0)
    u_in = torch.arange(0.5, 20.0)
    assert fc.fpr_at_95_tpr(u_in, u_out).item() == pytest.approx(18 / 20)
    assert fc.fpr_at_95_tpr(torch.zeros(3), torch.ones(5)).item() == 0.0


@pytest.mark.parametrize(
    ("metric", "function"),
    [
        (MulticlassNLL(), fc.multiclass_nll),
        (BrierScore(), fc.brier_score),
        (ExpectedCalibrationError(), fc.expected_calibration_error),
        (
            ExpectedCalibrationError(num_bins=7),
            lambda p, t: fc.expected_calibration_error(p, t, num_bins=7),
        ),
    ],
)
def test_uneven_batches_equal_functional_on_concatenation(metric, function):
    probs, target = _data(dtype=torch.float32)
    for batch in zip(probs.split(SIZES), target.split(SIZES), strict=True):
        metric.update(*batch)
    expected = function(probs, target).item()
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5, abs=1e-7)

    metric.reset()
    metric.update(probs[:10], target[:10])
    expected = function(probs[:10], target[:10]).item()
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ood_detection_metric_over_uneven_batches():
    u_in, u_out = _ood_scores(5, ties=True)
    scores = torch.from_numpy(np.r_[u_in, u_out])
    is_ood = torch.from_numpy(np.r_[np.zeros(len(u_in)), np.ones(len(u_out))]).bool()
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))
    scores, is_ood = scores[perm], is_ood[perm]
    metric = OODDetection()
    sizes = [3, 100, 1, 153]
    for i, (s, o) in enumerate(zip(scores.split(sizes), is_ood.split(sizes), strict=True)):
        metric.update(s, o if i % 2 else o.long())  # bool or 0/1 labels
    result = metric.compute()
    assert set(result) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    labels, all_scores = _sklearn_labels(u_in, u_out)
    assert result["auroc"].item() == pytest.approx(roc_auc_score(labels, all_scores), rel=1e-12)
    assert result["fpr95"].item() == pytest.approx(_reference_fpr95(u_in, u_out), abs=1e-15)


def test_states_reduce_for_ddp():
    assert MulticlassNLL()._reductions.keys() == {"total", "count"}
    ece = ExpectedCalibrationError(num_bins=12)
    assert set(ece._reductions) == {"conf_sum", "acc_sum", "bin_count"}
    assert all(getattr(ece, name).shape == (12,) for name in ece._reductions)
    assert set(OODDetection()._reductions) == {"uncertainty", "is_ood"}


def test_bad_arguments():
    probs, target = _data(n=4)
    with pytest.raises(ValueError, match=r"`probs` must be probabilities"):
        fc.multiclass_nll(probs.log(), target)
    with pytest.raises(ValueError, match=r"`target` must hold class labels in \[0, 5\)"):
        BrierScore().update(probs, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match=r"`target` must have shape \[N\]"):
        fc.brier_score(probs, target[:3])
    with pytest.raises(ValueError, match="`target` must hold integer"):
        fc.brier_score(probs, target.double())
    with pytest.raises(ValueError, match="`num_bins`"):
        ExpectedCalibrationError(num_bins=0)
    with pytest.raises(ValueError, match="`uncertainty_out` is empty"):
        fc.ood_auroc(torch.ones(3), torch.ones(0))
    with pytest.raises(ValueError, match="`uncertainty_in` holds NaN"):
        fc.fpr_at_95_tpr(torch.tensor([float("nan")]), torch.ones(2))
    with pytest.raises(ValueError, match="both in-distribution and OOD"):
        metric = OODDetection()
        metric.update(torch.ones(3), torch.zeros(3, dtype=torch.bool))
        metric.compute()
    with pytest.raises(ValueError, match="`is_ood` must hold booleans"):
        OODDetection().update(torch.ones(2), torch.tensor([0, 2]))
