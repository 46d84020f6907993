"""Bad input fails early and clearly; the training set size N is read from the loader."""

import pytest
import torch
from lightning import Trainer, seed_everything
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import NLL
from uq_box.methods import BNNVIRegression
from uq_box.models import MLP


def trainer(**extra):
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def toy_data(n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=generator)
    return x, torch.sin(x) + 0.1 * torch.randn(n, 1, generator=generator)


def bnn(n_outputs=2, **kwargs):
    network = MLP(n_inputs=1, n_hidden=[8], n_outputs=n_outputs)
    kwargs.setdefault("stochastic_module_names", [-1])
    kwargs.setdefault("num_mc_samples_train", 2)
    kwargs.setdefault("num_mc_samples_test", 3)
    return BNNVIRegression(network, **kwargs)


# -- network width vs criterion ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("n_outputs", "criterion", "pattern"),
    [
        (2, NLL(std=0.5), r"gives 2 outputs.*NLL needs 1"),
        (1, NLL(), r"gives 1 outputs.*NLL needs 2"),
    ],
)
def test_output_width_mismatch_fails_on_first_step(n_outputs, criterion, pattern):
    seed_everything(0)
    model = bnn(n_outputs, criterion=criterion)
    dm = ArrayDataModule(*toy_data(), batch_size=16)
    with pytest.raises(ValueError, match=pattern) as info:
        trainer(fast_dev_run=True).fit(model, dm)
    assert "n_outputs" in str(info.value)
    assert model.global_step == 0  # it failed before any optimizer step


# -- constructor arguments --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_mc_samples_train": 0}, "num_mc_samples_train"),
        ({"num_mc_samples_train": 2.5}, "num_mc_samples_train"),
        ({"num_mc_samples_test": -3}, "num_mc_samples_test"),
        ({"beta": -1.0}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"burnin_epochs": -1}, "burnin_epochs"),
        ({"burnin_epochs": 1.5}, "burnin_epochs"),
        ({"estimator": "bad"}, "estimator"),
        ({"num_training_points": 0}, "num_training_points"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        bnn(**kwargs)
    assert repr(next(iter(kwargs.values()))) in str(info.value)


# -- non-finite loss --------------------------------------------------------------------------
def test_non_finite_loss_stops_with_epoch_and_step():
    seed_everything(0)
    x, y = toy_data(64)
    y[40] = 1e30  # finite in float32, but its squared error overflows: batch 2 of 4 (in order)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    model = bnn(1, criterion=NLL(std=1.0))
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 2 \(batch 2\)"):
        trainer(max_epochs=1, limit_val_batches=0).fit(model, loader)


def test_huge_learning_rate_stops_training():
    seed_everything(0)
    model = bnn(2, optimizer=lambda params: torch.optim.SGD(params, lr=1e10))
    dm = ArrayDataModule(*toy_data(64), batch_size=16)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss.*epoch \d+, step \d+"):
        trainer(max_epochs=5, limit_val_batches=0).fit(model, dm)


# -- the training set size N ------------------------------------------------------------------
class _Stream(IterableDataset):
    """An iterable dataset without ``__len__``."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y, strict=True))


def test_iterable_dataset_without_len_needs_num_training_points():
    seed_everything(0)
    x, y = toy_data(32)
    loader = DataLoader(_Stream(x, y), batch_size=8)
    model = bnn(2)
    with pytest.raises(ValueError, match="`num_training_points`"):
        trainer(max_epochs=1, limit_val_batches=0).fit(model, loader)


def test_iterable_dataset_with_num_training_points_trains():
    seed_everything(0)
    x, y = toy_data(32)
    model = bnn(2, num_training_points=32)
    trainer(max_epochs=1, limit_val_batches=0).fit(model, DataLoader(_Stream(x, y), batch_size=8))
    assert model.num_training_points == 32
    assert model.global_step == 4


def test_num_training_points_from_array_datamodule():
    seed_everything(0)
    x, y = toy_data(100)
    dm = ArrayDataModule(x[:70], y[:70], x[70:], y[70:], batch_size=16)
    model = bnn(2)
    trainer(max_epochs=1).fit(model, dm)
    assert model.num_training_points == len(dm.X_train) == 70


def test_num_training_points_from_tensor_dataset_loader_with_tuple_batches():
    seed_everything(0)
    x, y = toy_data(48)
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True)
    model = bnn(2)
    trainer(max_epochs=2, limit_val_batches=0).fit(model, loader)
    assert model.num_training_points == 48
    assert model.global_step == 6
    preds = model.predict_step(next(iter(loader)))  # a (x, y) tuple batch
    assert preds["pred"].shape == (16, 1)


def test_num_training_points_explicit_wins_over_loader():
    seed_everything(0)
    model = bnn(2, num_training_points=1000)
    trainer(max_epochs=1, limit_val_batches=0).fit(model, ArrayDataModule(*toy_data(32)))
    assert model.num_training_points == 1000


def test_num_training_points_counts_the_sampled_subset():
    """A loader that trains on a subset of its dataset (a sampler over 30 of 100 points) has
    N = 30: the ELBO's data term sums over the points actually trained on."""
    seed_everything(0)
    x, y = toy_data(100)
    sampler = torch.utils.data.SubsetRandomSampler(range(30))
    loader = DataLoader(TensorDataset(x, y), batch_size=10, sampler=sampler)
    model = bnn(2)
    trainer(max_epochs=1, limit_val_batches=0).fit(model, loader)
    assert model.global_step == 3
    assert model.num_training_points == 30


def test_mc_dropout_names_layer_and_method_apart():
    """``uq_box.nn.MCDropout`` is the layer; the methods say where to look instead."""
    import uq_box.methods
    from uq_box.methods import MCDropoutMethod, MCDropoutRegression
    from uq_box.nn import MCDropout

    assert issubclass(MCDropoutRegression, MCDropoutMethod) and not issubclass(
        MCDropoutRegression, MCDropout
    )
    with pytest.raises(AttributeError, match="MCDropoutRegression.*uq_box.nn.MCDropout"):
        uq_box.methods.MCDropout  # noqa: B018
