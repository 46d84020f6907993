"""AUPR-in, AUPR-out and the four OOD metrics together, against scikit-learn.

Random and tied scores (integers with few values), integer and boolean scores, both directions,
and the OODDetection metric class over uneven batches.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from uq_box.metrics import OODDetection
from uq_box.metrics.functional_ood import ood_aupr_in, ood_aupr_out, ood_detection_metrics


def _scores(seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many ties, across the two groups too
        return rng.integers(0, 6, 120).astype(float), rng.integers(2, 9, 80).astype(float)
    return rng.normal(0.0, 1.0, 150), rng.normal(1.0, 1.5, 90)


def _reference(u_in, u_out):
    labels = np.r_[np.zeros(len(u_in)), np.ones(len(u_out))]
    scores = np.r_[u_in, u_out]
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(labels, scores),
        "aupr_in": average_precision_score(1 - labels, -scores),
        "aupr_out": average_precision_score(labels, scores),
        "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")],
    }


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn(seed, ties):
    u_in, u_out = _scores(seed, ties)
    expected = _reference(u_in, u_out)
    t_in, t_out = torch.from_numpy(u_in), torch.from_numpy(u_out)
    result = ood_detection_metrics(t_in, t_out)
    assert set(result) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    for key, value in result.items():
        assert value.dtype == torch.float64
        assert value.item() == pytest.approx(expected[key], abs=1e-12), key
    assert ood_aupr_out(t_in, t_out).item() == pytest.approx(expected["aupr_out"], abs=1e-12)
    assert ood_aupr_in(t_in, t_out).item() == pytest.approx(expected["aupr_in"], abs=1e-12)
    # float32 scores and integer scores rank alike
    assert ood_aupr_in(t_in.float(), t_out.float()).item() == pytest.approx(
        _reference(u_in.astype(np.float32), u_out.astype(np.float32))["aupr_in"], abs=1e-7
    )
    if ties:
        ints = ood_detection_metrics(t_in.long(), t_out.long())
        for key, value in ints.items():
            assert value.item() == pytest.approx(expected[key], abs=1e-12), key


def test_direction_swaps_the_roles():
    u_in, u_out = _scores(3, ties=False)
    t_in, t_out = torch.from_numpy(u_in), torch.from_numpy(u_out)
    flipped = ood_detection_metrics(-t_in, -t_out)
    straight = ood_detection_metrics(t_in, t_out)
    # AUROC of the negated score is 1 - AUROC (no ties); AUPR-in of a score is AUPR-out of
    # the negated score with the groups swapped
    assert flipped["auroc"].item() == pytest.approx(1.0 - straight["auroc"].item(), abs=1e-12)
    assert ood_aupr_in(t_in, t_out).item() == pytest.approx(
        ood_aupr_out(-t_out, -t_in).item(), abs=1e-12
    )


def test_edge_cases_and_closed_forms():
    # perfect separation: every area is 1, FPR95 is 0
    perfect = ood_detection_metrics(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0, 4.0]))
    assert {k: v.item() for k, v in perfect.items()} == {
        "auroc": 1.0,
        "aupr_in": 1.0,
        "aupr_out": 1.0,
        "fpr95": 0.0,
    }
    # all scores tied: precision is the share of the positive class at the only threshold
    tied = ood_detection_metrics(torch.ones(3), torch.ones(5))
    assert tied["auroc"].item() == 0.5
    assert tied["aupr_out"].item() == pytest.approx(5 / 8)
    assert tied["aupr_in"].item() == pytest.approx(3 / 8)
    assert tied["fpr95"].item() == 1.0
    # booleans are scores too
    b_in, b_out = torch.tensor([False, False, True]), torch.tensor([True, True])
    assert ood_aupr_in(b_in, b_out).item() == pytest.approx(
        average_precision_score([1, 1, 1, 0, 0], [0, 0, -1, -1, -1])
    )
    with pytest.raises(ValueError, match="`uncertainty_out` is empty"):
        ood_aupr_out(torch.ones(2), torch.ones(0))
    with pytest.raises(ValueError, match="`uncertainty_in` holds NaN"):
        ood_aupr_in(torch.tensor([float("nan")]), torch.ones(2))


def test_ood_detection_metric_class_has_the_four_metrics():
    u_in, u_out = _scores(4, ties=True)
    metric = OODDetection()
    metric.update(torch.from_numpy(u_in[:50]), torch.zeros(50, dtype=torch.bool))
    metric.update(
        torch.from_numpy(np.r_[u_in[50:], u_out]),
        torch.from_numpy(np.r_[np.zeros(len(u_in) - 50), np.ones(len(u_out))]).long(),
    )
    result = metric.compute()
    expected = _reference(u_in, u_out)
    assert set(result) == set(expected)
    for key, value in result.items():
        assert value.item() == pytest.approx(expected[key], abs=1e-12), key
