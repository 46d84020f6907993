"""Dense prediction plots and their place in the CLI report."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning import Trainer, seed_everything  # noqa: E402

from uq_box.datamodules import ToyPixelRegressionDatamodule, ToySegmentationDatamodule  # noqa: E402
from uq_box.methods.dense import MCDropoutPixelRegression, MCDropoutSegmentation  # noqa: E402
from uq_box.metrics.dense import dense_sparsification_curves  # noqa: E402
from uq_box.models import UNet  # noqa: E402
from uq_box.report import write_report  # noqa: E402
from uq_box.viz.dense import plot_dense_predictions, plot_sparsification  # noqa: E402


def test_dense_plots_and_report(tmp_path):
    seed_everything(0)
    for method, data in (
        (
            MCDropoutSegmentation(
                UNet(1, 3, depth=1, width=4, dropout_p=0.2), num_mc_samples_test=3
            ),
            ToySegmentationDatamodule(8, 4, 4, image_size=8, unlabeled_fraction=0.2, batch_size=8),
        ),
        (
            MCDropoutPixelRegression(
                UNet(1, 2, depth=1, width=4, dropout_p=0.2), num_mc_samples_test=3
            ),
            ToyPixelRegressionDatamodule(8, 4, 4, image_size=8, batch_size=8),
        ),
    ):
        Trainer(
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(method, data)
        preds = method.predict_step(data.X_test)
        fig = plot_dense_predictions(data.X_test, data.Y_test, preds, num_images=3)
        assert len(fig.axes) >= 18  # 3 rows x 6 panels (+ colorbars)
        assert [ax.get_title() for ax in fig.axes[:6]] == [
            "image",
            "target",
            "prediction",
            "aleatoric",
            "epistemic",
            "error",
        ]
        plt.close(fig)
        curves = dense_sparsification_curves(preds, data.Y_test)
        assert set(curves) == {"total", "aleatoric", "epistemic"}
        assert all(torch.isfinite(c["ause"]) for c in curves.values())
        plt.close(plot_sparsification(curves))
        run = tmp_path / type(method).__name__
        folder = write_report(method, data, run, {"test_nll": 1.0})
        names = {p.name for p in folder.glob("*.png")}
        assert {"dense_predictions.png", "sparsification.png"} <= names
