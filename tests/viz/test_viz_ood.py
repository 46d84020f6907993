"""OOD plots: the ROC curve against scikit-learn, the figure's panels, the errors."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from uq_box.viz import ood_roc_curve, plot_ood_detection


@pytest.mark.parametrize("ties", [False, True])
def test_roc_curve_matches_sklearn(ties):
    rng = np.random.default_rng(0)
    if ties:
        s_in, s_out = rng.integers(0, 5, 60).astype(float), rng.integers(2, 7, 40).astype(float)
    else:
        s_in, s_out = rng.normal(size=60), rng.normal(1.0, size=40)
    fpr, tpr = ood_roc_curve(torch.from_numpy(s_in), s_out)
    labels = np.r_[np.zeros(60), np.ones(40)]
    ref_fpr, ref_tpr, _ = roc_curve(labels, np.r_[s_in, s_out], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    area = np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)
    assert area == pytest.approx(roc_auc_score(labels, np.r_[s_in, s_out]))


def test_plot_ood_detection_panels_and_errors():
    rng = np.random.default_rng(1)
    fig = plot_ood_detection(rng.normal(size=50), torch.randn(30) + 2.0)
    assert len(fig.axes) == 2
    assert "AUROC" in fig.axes[1].get_legend().get_texts()[0].get_text()
    plt.close(fig)
    scores_in = {"entropy": rng.random(40), "energy": -rng.random(40)}
    scores_out = {"entropy": rng.random(20) + 0.5, "energy": rng.random(20)}
    fig = plot_ood_detection(scores_in, scores_out, bins=10)
    assert len(fig.axes) == 3
    labels = [t.get_text() for t in fig.axes[2].get_legend().get_texts()]
    assert labels[0].startswith("entropy (AUROC") and labels[-1] == "chance"
    plt.close(fig)
    with pytest.raises(ValueError, match="must name the same scores"):
        plot_ood_detection(scores_in, {"entropy": rng.random(3)})
    with pytest.raises(ValueError, match="`scores_in\\['entropy'\\]` holds NaN"):
        plot_ood_detection({"entropy": np.array([np.nan])}, {"entropy": np.ones(2)})
    with pytest.raises(ValueError, match="`scores_out` is empty"):
        ood_roc_curve(np.ones(3), np.ones(0))
    with pytest.raises(ValueError, match="`bins` must be a positive integer"):
        plot_ood_detection(np.ones(3), np.ones(3), bins=0)
