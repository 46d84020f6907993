"""Several regression targets: ``NLL()`` reads ``[..., 2T]`` outputs as ``T`` (mean, scale) pairs.

A mean-variance network fitted on two targets with different noise levels predicts a mean and a
std per target, ``[N, 2]``, each at its own noise level; the validation metrics take the
``[N, T]`` predictions.
"""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import NLL
from uq_box.methods import MVERegression
from uq_box.models import MLP

NOISE = (0.1, 0.5)


def test_nll_reads_mean_and_scale_per_target():
    outputs = torch.randn(3, 5, 4)  # [S, N, (mean, scale) of 2 targets]
    mean, std = NLL().mean_and_std(outputs)
    assert mean.shape == std.shape == (3, 5, 2)
    torch.testing.assert_close(mean, outputs[..., 0::2])
    torch.testing.assert_close(std, torch.nn.functional.softplus(outputs[..., 1::2]) + 1e-6)
    fixed_mean, fixed_std = NLL(std=0.3).mean_and_std(outputs)
    assert fixed_mean is outputs and fixed_std.shape == (3, 5, 4)
    with pytest.raises(ValueError, match="even number"):
        NLL().mean_and_std(torch.randn(5, 3))


def test_two_target_mve_fits_each_noise_level():
    seed_everything(0)
    x = 4 * torch.rand(2000, 1) - 2
    noise = torch.tensor(NOISE) * torch.randn(2000, 2)
    y = torch.cat([x, -x], dim=1) + noise
    dm = ArrayDataModule(x[:1600], y[:1600], x[1600:], y[1600:], x[1600:], y[1600:], batch_size=200)
    method = MVERegression(MLP(1, [32, 32], 4), optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = quiet_trainer(max_epochs=30, accelerator="cpu")
    trainer.fit(method, datamodule=dm)
    assert trainer.callback_metrics["val_nll"].isfinite()

    grid = torch.linspace(-1.5, 1.5, 50).unsqueeze(-1)
    preds = method.predict_step(grid)
    assert preds["pred"].shape == preds["pred_uct"].shape == preds["aleatoric_uct"].shape == (50, 2)
    torch.testing.assert_close(preds["pred"], torch.cat([grid, -grid], 1), atol=0.1, rtol=0)
    noise_levels = preds["aleatoric_uct"].mean(0)
    torch.testing.assert_close(noise_levels, torch.tensor(NOISE), rtol=0.25, atol=0)
