"""DUE: the two-moons far-field test, the ELBO's scaling, the inducing points' initialization and
its life cycle (resume, second fit), the regression predictive, bad input.

The far-field test (issue #15 item 7): trained on two moons, DUE's uncertainty on
``FarCloudDatamodule`` points (a cloud around (4, 3)) must exceed that on the two-moons test
points, with an OOD AUROC above 0.9 (``benchmarks/single_pass_two_moons.py``).
"""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.datamodules import ArrayDataModule, TwoMoonsDatamodule
from uq_box.datamodules.ood import FarCloudDatamodule
from uq_box.losses import NLL
from uq_box.methods import DUEClassification, DUERegression
from uq_box.metrics.functional_ood import ood_detection_metrics
from uq_box.models import MLP
from uq_box.nn.spectral import is_spectral_normalized
from uq_box.nn.svgp import GaussianLikelihood, SparseVariationalGP

OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)


def _auroc(score_in, score_out):
    return float(ood_detection_metrics(score_in, score_out)["auroc"])


def test_due_uncertainty_rises_away_from_the_two_moons():
    data = TwoMoonsDatamodule(n_points=500, n_test=300, batch_size=64)
    x_in, y_in = data.split("test")
    x_out = FarCloudDatamodule(n_points=300).split("test")[0]
    seed_everything(0)
    method = DUEClassification(MLP(2, [128], 2), optimizer=OPTIMIZER)
    assert is_spectral_normalized(method.model.model[0])
    assert isinstance(method.model.model[3], SparseVariationalGP)
    quiet_trainer(max_epochs=30).fit(method, data)
    p_in, p_out = method.predict_step(x_in), method.predict_step(x_out)
    assert float((p_in["pred"].argmax(-1) == y_in).float().mean()) > 0.8
    for key in ("epistemic_uct", "pred_uct", "logit_var"):
        assert float(p_out[key].mean()) > float(p_in[key].mean()), key
    assert _auroc(p_in["epistemic_uct"], p_out["epistemic_uct"]) > 0.95
    assert _auroc(p_in["logit_var"], p_out["logit_var"]) > 0.95
    # the far cloud's logit variance approaches the prior's, the output scale
    prior = method.gp.outputscale.mean().item()
    assert 0.5 * prior < float(p_out["logit_var"].mean()) <= 1.01 * prior


def _regression_data(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=generator) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def test_the_loss_is_the_exactly_scaled_elbo():
    seed_everything(0)
    x, y = _regression_data()
    method = DUERegression(MLP(1, [16], 1), num_inducing=5, num_training_points=1000)
    method.train()
    terms, outputs = method.loss(x[:16], y[:16])
    assert method.gp.initialized  # no trainer: the first training batch initialized it
    mean, var = method.marginals(x[:16])
    noise = method.criterion.noise
    expected_nll = (
        0.5 * torch.log(2 * torch.pi * noise) + ((y[:16] - mean) ** 2 + var) / (2 * noise)
    ).mean()
    kl = method.gp.kl_divergence()
    torch.testing.assert_close(terms["nll"], expected_nll)
    torch.testing.assert_close(terms["kl"], kl / 1000)
    torch.testing.assert_close(terms["loss"], (1000 * expected_nll + kl) / 1000)
    assert outputs.shape == (1, 16, 1)
    terms["loss"].backward()  # the ELBO's gradient reaches the backbone, the GP and the noise
    for name, p in method.named_parameters():
        if "variational_tril" not in name and "_u" not in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_inducing_points_are_initialized_once_and_checkpoints_carry_them(tmp_path):
    seed_everything(0)
    x, y = _regression_data()
    data = ArrayDataModule(x, y, x[:8], y[:8], batch_size=16)
    method = DUERegression(MLP(1, [16], 1), num_inducing=6, num_init_points=32)
    before = method.gp.inducing_points.detach().clone()
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(method, data)
    gp = method.gp
    assert gp.initialized and not torch.equal(gp.inducing_points, before)
    trainer.save_checkpoint(tmp_path / "due.ckpt")
    loaded = DUERegression.load_from_checkpoint(
        tmp_path / "due.ckpt", model=MLP(1, [16], 1), weights_only=True
    )
    assert loaded.gp.initialized
    torch.testing.assert_close(loaded.gp.inducing_points, gp.inducing_points)
    torch.manual_seed(1)
    expected = method.predict_step(x[:5])
    torch.manual_seed(1)
    got = loaded.predict_step(x[:5])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    # a second fit goes on from the trained inducing points (no k-means again)
    trained = gp.inducing_points.detach().clone()
    calls = []
    gp.initialize = lambda *args, **kwargs: calls.append(args)
    quiet_trainer(max_epochs=1).fit(method, data)
    assert not calls
    assert not torch.equal(gp.inducing_points, trained)  # trained on


def test_due_regression_epistemic_grows_away_from_the_data():
    seed_everything(0)
    x, y = _regression_data(200)
    data = ArrayDataModule(x, y, batch_size=32)
    method = DUERegression(MLP(1, [64], 1), optimizer=partial(torch.optim.Adam, lr=1e-2))
    quiet_trainer(max_epochs=30).fit(method, data)
    grid = torch.linspace(-0.9, 0.9, 20)[:, None]
    near, far = method.predict_step(grid), method.predict_step(torch.linspace(4, 6, 20)[:, None])
    assert float(far["epistemic_uct"].mean()) > 3 * float(near["epistemic_uct"].mean())
    assert float(((near["pred"] - torch.sin(3 * grid)) ** 2).mean()) < 0.05
    noise_std = float(method.criterion.noise.sqrt())
    assert 0.1 < noise_std < 0.1**0.5  # learned: down from its initial std towards the data's, 0.1
    torch.testing.assert_close(near["aleatoric_uct"], torch.full((20, 1), noise_std))
    torch.testing.assert_close(
        near["pred_uct"] ** 2, near["aleatoric_uct"] ** 2 + near["epistemic_uct"] ** 2
    )


def test_bad_input():
    with pytest.raises(ValueError, match="DUERegression must be uq_box.nn.svgp.GaussianLikelihood"):
        DUERegression(MLP(1, [8], 2), criterion=NLL())
    with pytest.raises(
        ValueError, match="`output_layer`: layer .model.1. \\(ReLU\\) has no parameters"
    ):
        DUEClassification(MLP(2, [8], 2), output_layer="model.1")
    with pytest.raises(ValueError, match="`spectral_module_names` names the output layer"):
        DUEClassification(MLP(2, [8], 2), spectral_module_names=[-1])
    with pytest.raises(ValueError, match="`kernel`"):
        DUEClassification(MLP(2, [8], 2), kernel="linear")
    with pytest.raises(ValueError, match="`num_inducing`"):
        DUEClassification(MLP(2, [8], 2), num_inducing=0)
    with pytest.raises(ValueError, match="`lengthscale`"):
        DUEClassification(MLP(2, [8], 2), lengthscale=-1.0)
    # a loader with fewer points than inducing points
    x, y = _regression_data(8)
    method = DUERegression(MLP(1, [8], 1), num_inducing=10)
    with pytest.raises(ValueError, match="10 inducing points needs at least as many"):
        quiet_trainer(max_epochs=1).fit(method, ArrayDataModule(x, y, batch_size=4))
    assert GaussianLikelihood(num_targets=2).noise.shape == (2,)
