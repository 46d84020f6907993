"""The parameter-efficient ensembles as methods: two moons, members that differ, the objectives."""

from functools import partial

import pytest
import torch
from helpers import quiet_trainer
from lightning import seed_everything

from uq_box.datamodules import TwoMoonsDatamodule
from uq_box.losses import NLL
from uq_box.methods import (
    BatchEnsembleClassification,
    MasksemblesClassification,
    MIMOClassification,
    MIMORegression,
    PackedEnsembleClassification,
    Rank1BNNClassification,
    Rank1BNNRegression,
)
from uq_box.models import CNN, MLP
from uq_box.nn.efficient import rank1_kl

CLASSIFIERS = {
    "batch_ensemble": (BatchEnsembleClassification, {"num_members": 4}),
    "packed_ensemble": (PackedEnsembleClassification, {"num_members": 4, "alpha": 2}),
    "mimo": (MIMOClassification, {"num_members": 3}),
    "masksembles": (MasksemblesClassification, {"num_members": 4, "scale": 2.0}),
    "rank1_bnn": (Rank1BNNClassification, {"num_members": 4, "num_mc_samples_test": 2}),
}


@pytest.fixture(scope="module")
def moons():
    return TwoMoonsDatamodule(n_points=400, noise=0.1, n_test=400, batch_size=32)


@pytest.mark.parametrize("name", list(CLASSIFIERS))
def test_fits_two_moons_and_members_differ(name, moons):
    cls, kwargs = CLASSIFIERS[name]
    seed_everything(0)
    method = cls(MLP(2, [32, 32], 2), optimizer=partial(torch.optim.Adam, lr=1e-2), **kwargs)
    quiet_trainer(max_epochs=25, accelerator="cpu").fit(method, moons)
    x, y = moons.X_test, moons.Y_test
    preds = method.predict_step(x)
    accuracy = (preds["pred"].argmax(-1) == y).float().mean()
    assert accuracy > 0.9, accuracy
    members = preds["logits"]
    samples = kwargs["num_members"] * kwargs.get("num_mc_samples_test", 1)
    assert members.shape == (samples, len(x), 2)
    probs = members.softmax(-1)
    assert (probs[0] - probs[1:]).abs().amax() > 1e-3  # the members differ after training
    assert preds["epistemic_uct"].max() > 0


def test_rank1_bnn_loss_is_the_elbo_of_bnn_vi():
    """Data NLL mean (over members, samples, points) + KL / N, the KL the mean over members."""
    torch.manual_seed(0)
    method = Rank1BNNRegression(
        MLP(1, [8], 2), num_members=3, num_mc_samples_train=2, num_training_points=50
    )
    x, y = torch.randn(10, 1), torch.randn(10, 1)
    torch.manual_seed(1)
    terms, outputs = method.loss(x, y)
    assert outputs.shape == (6, 10, 2)  # M * K samples, member-major
    torch.manual_seed(1)
    again = method.sample_outputs(x, 2)
    nll = NLL()(again, y)
    torch.testing.assert_close(terms["nll"], nll)
    torch.testing.assert_close(terms["kl"], rank1_kl(method.model))
    torch.testing.assert_close(terms["loss"], nll + rank1_kl(method.model) / 50)


def test_mimo_training_gives_each_member_its_own_shuffle_in_batch_order():
    torch.manual_seed(0)
    method = MIMORegression(MLP(2, [8], 2), num_members=3)
    x = torch.randn(6, 2)
    method.train()
    torch.manual_seed(2)
    aligned = method.shuffled_outputs(x)
    torch.manual_seed(2)  # replay the shuffles
    order = torch.arange(6).expand(3, 6).clone()
    free = (torch.rand(6) >= 0.0).nonzero().squeeze(1)
    order[:, free] = free[torch.rand(3, free.numel()).argsort(1)]
    raw = method.model.forward_members(x[order])
    for m in range(3):
        for j in range(6):
            torch.testing.assert_close(aligned[m, order[m, j]], raw[m, j])
    # every row repeated: each member sees the same input, as at test time
    method.input_repetition = 1.0
    torch.testing.assert_close(method.shuffled_outputs(x), method.sample_outputs(x, 1))


def test_batch_ensemble_and_mimo_on_the_digits_cnn_predict_images():
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8)
    for cls in (BatchEnsembleClassification, MIMOClassification):
        preds = cls(CNN(), num_members=4).predict_step(x)
        assert preds["logits"].shape == (4, 5, 10)
