"""SNGP and DDU: the two-moons far-field test, the precision's life cycle, the feature density.

The far-field test (issue #15 item 7): trained on two moons, a method's uncertainty on
``FarCloudDatamodule`` points (a cloud around (4, 3)) must exceed that on the two-moons test
points, with an OOD AUROC above 0.9. MC dropout and deep ensembles on the same data:
``benchmarks/single_pass_two_moons.py`` and docs/user-guide/single-pass.md.
"""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.datamodules import ArrayDataModule, TwoMoonsDatamodule
from uq_box.datamodules.ood import FarCloudDatamodule
from uq_box.losses import MSE, PinballLoss
from uq_box.methods import DDUClassification, SNGPClassification, SNGPRegression
from uq_box.metrics.functional_ood import ood_detection_metrics
from uq_box.models import MLP
from uq_box.nn.gp import RandomFeatureGP
from uq_box.nn.spectral import is_spectral_normalized

OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)


@pytest.fixture(scope="module")
def moons():
    data = TwoMoonsDatamodule(n_points=500, n_test=300, batch_size=64)
    return data, data.split("test")[0], FarCloudDatamodule(n_points=300).split("test")[0]


def _fit(method, data, epochs):
    quiet_trainer(max_epochs=epochs).fit(method, data)
    return method


def _auroc(score_in, score_out):
    return float(ood_detection_metrics(score_in, score_out)["auroc"])


def test_sngp_uncertainty_rises_away_from_the_two_moons(moons):
    data, x_in, x_out = moons
    seed_everything(0)
    method = _fit(
        SNGPClassification(MLP(2, [128], 2), optimizer=OPTIMIZER, num_features=512), data, 30
    )
    assert is_spectral_normalized(method.model.model[0])
    assert isinstance(method.model.model[3], RandomFeatureGP)
    p_in, p_out = method.predict_step(x_in), method.predict_step(x_out)
    accuracy = (p_in["pred"].argmax(-1) == data.split("test")[1]).float().mean()
    assert float(accuracy) > 0.85
    for key in ("epistemic_uct", "pred_uct", "logit_var"):
        assert float(p_out[key].mean()) > float(p_in[key].mean()), key
    assert _auroc(p_in["epistemic_uct"], p_out["epistemic_uct"]) > 0.99
    assert _auroc(p_in["logit_var"], p_out["logit_var"]) > 0.99
    assert _auroc(p_in["pred_uct"], p_out["pred_uct"]) > 0.9
    # the mean field: softmax(f / sqrt(1 + pi / 8 v))
    mean_field = p_out["pred_mean_field"]
    torch.testing.assert_close(mean_field.sum(-1), torch.ones(len(x_out)))
    # the far cloud's logit variance approaches the prior's, 1 / ridge_penalty
    assert 0.5 < float(p_out["logit_var"].mean()) <= 1.05


def test_ddu_density_score_finds_the_far_cloud(moons):
    data, x_in, x_out = moons
    seed_everything(0)
    method = DDUClassification(MLP(2, [128], 2), optimizer=OPTIMIZER)
    assert not method.density.fitted
    _fit(method, data, 20)
    assert method.density.fitted  # fitted when training ends
    p_in, p_out = method.predict_step(x_in), method.predict_step(x_out)
    assert (p_in["epistemic_uct"] == 0).all()
    assert _auroc(p_in["density_score"], p_out["density_score"]) > 0.9
    # the density is that of the training features: refitting on the training data changes nothing
    before = p_in["density_score"].clone()
    method.fit_density(data.train_dataloader())
    torch.testing.assert_close(
        method.predict_step(x_in)["density_score"], before, rtol=1e-4, atol=0
    )


def test_sngp_precision_is_the_last_epochs_and_checkpoints_carry_it(tmp_path):
    seed_everything(0)
    x = torch.randn(48, 2)
    data = ArrayDataModule(x, torch.sin(x[:, :1]), x[:8], torch.sin(x[:8, :1]), batch_size=16)
    method = SNGPRegression(MLP(2, [16], 2), num_features=24)
    trainer = quiet_trainer(max_epochs=2)
    trainer.fit(method, data)
    gp = method.gp
    # reset at the start of the last epoch: ridge I + the last epoch's 48 points, weights 1/sigma^2
    trace = float(gp.precision.trace())
    assert gp.ridge_penalty * 24 < trace < gp.ridge_penalty * 24 + 48 * 24 / 0.01
    trainer.save_checkpoint(tmp_path / "sngp.ckpt")
    loaded = SNGPRegression.load_from_checkpoint(
        tmp_path / "sngp.ckpt", model=MLP(2, [16], 2), weights_only=True
    )
    torch.testing.assert_close(loaded.gp.precision, gp.precision)
    torch.manual_seed(1)
    expected = method.predict_step(x[:5])
    torch.manual_seed(1)
    got = loaded.predict_step(x[:5])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])


def test_sngp_regression_epistemic_grows_away_from_the_data():
    seed_everything(0)
    x = torch.rand(200, 1) * 2 - 1
    y = torch.sin(3 * x) + 0.1 * torch.randn_like(x)
    data = ArrayDataModule(x, y, batch_size=32)
    method = _fit(SNGPRegression(MLP(1, [64], 2), optimizer=OPTIMIZER, num_features=256), data, 30)
    near = method.predict_step(torch.linspace(-0.9, 0.9, 20)[:, None])
    far = method.predict_step(torch.linspace(4, 6, 20)[:, None])
    assert float(far["epistemic_uct"].mean()) > 3 * float(near["epistemic_uct"].mean())
    assert (
        float(((near["pred"] - torch.sin(3 * torch.linspace(-0.9, 0.9, 20)[:, None])) ** 2).mean())
        < 0.1
    )
    torch.testing.assert_close(
        near["pred_uct"] ** 2, near["aleatoric_uct"] ** 2 + near["epistemic_uct"] ** 2
    )
    assert near["samples"].shape == (100, 20, 1)
    # MSE: one output, the training RMSE as the noise
    mse = SNGPRegression(MLP(1, [8], 1), criterion=MSE(), num_features=16)
    assert mse.predict_step(x[:3])["aleatoric_uct"].shape == (3, 1)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="`output_layer` 'model.1' is a ReLU|no parameters"):
        SNGPClassification(MLP(2, [8], 2), output_layer="model.1")
    with pytest.raises(ValueError, match="`spectral_module_names` names no layer 'fc'"):
        SNGPClassification(MLP(2, [8], 2), spectral_module_names=["fc"])
    with pytest.raises(ValueError, match="names the output layer"):
        SNGPClassification(MLP(2, [8], 2), spectral_module_names=[-1])
    with pytest.raises(ValueError, match="SNGPRegression must be uq_box.losses.NLL"):
        SNGPRegression(MLP(1, [8], 3), criterion=PinballLoss([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="`num_features`"):
        SNGPClassification(MLP(2, [8], 2), num_features=0)
    with pytest.raises(ValueError, match="`feature_layer` must name a submodule"):
        DDUClassification(MLP(2, [8], 2), feature_layer="fc")
    # a named feature layer: its output are the features
    method = DDUClassification(MLP(2, [8], 3), feature_layer="model.2")
    logits, features = method.logits_and_features(torch.randn(4, 2))
    assert logits.shape == (4, 3) and features.shape == (4, 8)
