"""Bad input fails early with a message naming the argument, what was given and what is expected.

One table of cases (docs/architecture.md, "Errors"); the rows every method shares (a network
output width that does not fit, zero sample counts and members, a negative burn-in) run on every
entry of the method registry in ``tests/conformance`` (``conformance_cases.bad_inputs``). Here:
output widths that do not fit a loss's options, bad ``stochastic_module_names``, non-positive
prior scales and sample counts, NaN or inf in data, inputs and targets of different lengths, a data module without the split a
post-hoc method needs, an unknown UCI data set or a corrupt UCI file, and a config with an unknown
key. Each row gives the exception type and three pieces of text the message must contain: the
argument's name, the given value and the expectation. A non-finite loss stops training with the
step and epoch.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from lightning import Trainer, seed_everything
from torch import nn
from torch.distributions import Normal

from uq_box.datamodules import ArrayDataModule
from uq_box.losses import MSE, NLL
from uq_box.methods import (
    BNNVIClassification,
    BNNVIRegression,
    ConformalRegression,
    DeterministicClassification,
    DeterministicRegression,
    MCDropoutRegression,
    MVERegression,
    QuantileRegression,
    SGMCMCRegression,
    SWAGRegression,
    TemperatureScaling,
)
from uq_box.models import MLP

REPO = Path(__file__).parents[2]


def trainer(**extra) -> Trainer:
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def arrays(n=64, classes=None):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=generator)
    if classes is not None:
        return x, torch.randint(0, classes, (n,), generator=generator)
    return x, x[:, :1].sin() + 0.1 * torch.randn(n, 1, generator=generator)


def regression_dm(**splits):
    x, y = arrays()
    return ArrayDataModule(x[:48], y[:48], X_test=x[48:], y_test=y[48:], batch_size=16, **splits)


def fit(method, dm=None):
    seed_everything(0)
    trainer(fast_dev_run=True).fit(method, dm if dm is not None else regression_dm())


def fit_classifier(method, classes):
    x, labels = arrays(classes=classes)
    fit(method, ArrayDataModule(x, labels, batch_size=16))


def mlp(n_outputs=2, **kwargs):
    return MLP(2, [8], n_outputs, **kwargs)


def with_layer_norm():
    return nn.Sequential(nn.Linear(2, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def with_value(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def conformal_without_calibration_split(_):
    fitted = MVERegression(mlp())
    fit(fitted)
    ConformalRegression(fitted).calibrate(regression_dm())


def temperature_scaling_without_validation_split(_):
    x, labels = arrays(classes=3)
    fitted = DeterministicClassification(mlp(3))
    dm = ArrayDataModule(x[:48], labels[:48], X_test=x[48:], y_test=labels[48:], batch_size=16)
    fit(fitted, dm)
    TemperatureScaling(fitted).calibrate(dm)


def uci(tmp_path, name="yacht", corrupt=False, root=None):
    from uq_box.datamodules.uci import UCIRegressionDatamodule

    if corrupt:
        shutil.copytree(root / "yacht", tmp_path / "yacht")
        with open(tmp_path / "yacht" / "data.txt", "a") as file:
            file.write("-2.3 0.568 not-a-number 3.99\n")
        root = tmp_path
    return UCIRegressionDatamodule(name=name, root=root)


def cli_with_unknown_key(tmp_path):
    from uq_box import cli

    config = (REPO / "configs" / "toy_heteroscedastic" / "bnn_vi.yaml").read_text()
    config = config.replace(
        "    burnin_epochs: 20\n", "    burnin_epochs: 20\n    num_mc_sample: 5\n"
    )
    path = tmp_path / "typo.yaml"
    path.write_text(config)
    with patch.object(sys, "argv", ["uq-box"]):  # not pytest's arguments
        cli.main(["fit", "--config", str(path)])


@dataclass
class Case:
    """``action(tmp_path)`` raises ``error``; its message holds ``argument``, ``given``, ``expected``."""

    id: str
    action: Callable[[Path], object]
    error: type[BaseException]
    argument: str
    given: str
    expected: str
    marks: tuple = ()


def on(make: Callable[[], object]) -> Callable[[Path], object]:
    return lambda _: make()


CASES = [
    # -- network output width vs loss or method
    Case(
        "fixed_std_nll_with_2_outputs",
        on(lambda: fit(MCDropoutRegression(mlp(2, dropout_p=0.1), criterion=NLL(std=0.1)))),
        ValueError,
        "`n_outputs`",
        "gives 2 outputs",
        "needs 1",
    ),
    Case(
        "quantile_network_with_2_outputs",
        on(lambda: QuantileRegression(mlp(2))),
        ValueError,
        "`n_outputs`",
        "`n_outputs`=2",
        "set `n_outputs` to 3",
    ),
    Case(
        "quantile_unsized_network_with_2_outputs",
        on(lambda: fit(QuantileRegression(nn.Sequential(nn.Linear(2, 8), nn.Linear(8, 2))))),
        ValueError,
        "`quantiles`",
        "gives 2 outputs",
        "needs 3",
    ),
    Case(
        "mve_with_mean_only_criterion",
        on(lambda: MVERegression(mlp(1), criterion=MSE())),
        ValueError,
        "`criterion`",
        "MSE()",
        "heteroscedastic uq_box.losses.NLL()",
    ),
    # -- stochastic_module_names
    Case(
        "stochastic_module_names_names_no_layer",
        on(lambda: BNNVIRegression(mlp(), stochastic_module_names=["model.9"])),
        ValueError,
        "`stochastic_module_names`",
        "'model.9'",
        "parameter-owning layers are ['model.0', 'model.3']",
    ),
    Case(
        "stochastic_module_names_unsupported_layer",
        on(lambda: BNNVIRegression(with_layer_norm(), stochastic_module_names=["1"])),
        ValueError,
        "`stochastic_module_names`",
        "is a LayerNorm",
        "supported: nn.Linear",
    ),
    Case(
        "stochastic_module_names_mixes_ints_and_strings",
        on(lambda: BNNVIRegression(mlp(), stochastic_module_names=[0, "model.3"])),
        TypeError,
        "`stochastic_module_names`",
        "[0, 'model.3']",
        "all ints (layer indices) or all strings",
    ),
    Case(
        "stochastic_module_names_index_out_of_range",
        on(lambda: BNNVIRegression(mlp(), stochastic_module_names=[5])),
        ValueError,
        "`stochastic_module_names`",
        "index 5",
        "valid indices -2..1",
    ),
    Case(
        "swag_stochastic_module_names_names_no_layer",
        on(lambda: SWAGRegression(mlp(), stochastic_module_names=["head"])),
        ValueError,
        "`stochastic_module_names`",
        "'head'",
        "parameter-owning layers are",
    ),
    Case(
        "sgmcmc_stochastic_module_names_mixes_ints_and_strings",
        on(lambda: SGMCMCRegression(mlp(), stochastic_module_names=["model.0", -1])),
        TypeError,
        "`stochastic_module_names`",
        "['model.0', -1]",
        "all ints (layer indices) or all strings",
    ),
    # -- prior scales and sample counts
    Case(
        "bnn_prior_scale_zero",
        on(lambda: BNNVIRegression(mlp(), prior=0.0)),
        ValueError,
        "`prior`",
        "got 0.0",
        "must be positive",
    ),
    Case(
        "sgmcmc_prior_scale_negative",
        on(lambda: SGMCMCRegression(mlp(), prior=-1.0)),
        ValueError,
        "`prior`",
        "got -1.0",
        "must be positive",
    ),
    Case(
        "bnn_prior_distribution_scale_zero",
        on(lambda: BNNVIRegression(mlp(), prior=Normal(0.0, 0.0, validate_args=False))),
        ValueError,
        "`prior`",
        "got 0.",
        "`scale` must satisfy GreaterThan(lower_bound=0.0)",
    ),
    Case(
        "swag_max_num_samples_negative",
        on(lambda: SWAGRegression(mlp(), max_num_samples=-2)),
        ValueError,
        "`max_num_samples`",
        "got -2",
        "positive integer",
    ),
    Case(
        "classification_bnn_num_mc_samples_test_fraction",
        on(lambda: BNNVIClassification(mlp(), num_mc_samples_test=2.5)),
        ValueError,
        "`num_mc_samples_test`",
        "got 2.5",
        "positive integer",
    ),
    # -- data
    Case(
        "nan_in_inputs",
        on(lambda: ArrayDataModule(with_value(arrays()[0], (3, 1), float("nan")), arrays()[1])),
        ValueError,
        "`X_train`",
        "contains 1 non-finite values (NaN or inf)",
        "expected finite data",
    ),
    Case(
        "inf_in_validation_targets",
        on(lambda: ArrayDataModule(*arrays(), *arrays(16)[:1], torch.full((16,), float("inf")))),
        ValueError,
        "`y_val`",
        "contains 16 non-finite values",
        "expected finite data",
    ),
    Case(
        "inputs_and_targets_of_different_lengths",
        on(lambda: ArrayDataModule(arrays()[0], arrays()[1][:60])),
        ValueError,
        "`y_train`",
        "`X_train` has 64 rows but `y_train` has 60",
        "expected the same",
    ),
    Case(
        "batch_size_zero",
        on(lambda: ArrayDataModule(*arrays(), batch_size=0)),
        ValueError,
        "`batch_size`",
        "got 0",
        "positive integer",
    ),
    # -- data module without the split a post-hoc method needs
    Case(
        "conformal_without_calibration_split",
        conformal_without_calibration_split,
        ValueError,
        "`X_calib`/`y_calib`",
        "has no 'calib' split; it has ['train', 'test']",
        "Hold out data the network was not trained on",
    ),
    Case(
        "temperature_scaling_without_validation_split",
        temperature_scaling_without_validation_split,
        ValueError,
        "`X_val`/`y_val`",
        "has no 'val' split; it has ['train', 'test']",
        "Hold out data the network was not trained on",
    ),
    Case(
        "conformal_alpha_above_one",
        on(lambda: ConformalRegression(MVERegression(mlp()), alpha=1.5)),
        ValueError,
        "`alpha`",
        "got 1.5",
        "a number in (0, 1)",
    ),
    # -- UCI data (uq_box/datamodules/uci.py)
    Case(
        "uci_unknown_dataset",
        lambda tmp_path: uci(tmp_path, name="yaht", root=tmp_path),
        ValueError,
        "`name`",
        "got 'yaht'",
        "must be one of bostonHousing",
    ),
    Case(
        "uci_corrupt_data_file",
        "uci_corrupt",  # needs the uci_root fixture, see test_error_messages
        ValueError,
        "data.txt",
        "is corrupt",
        "`root`",
    ),
    # -- CLI config
    Case(
        "cli_config_with_unknown_key",
        cli_with_unknown_key,
        SystemExit,
        "num_mc_sample",
        "uq_box.methods.BNNVIRegression",
        "is not accepted",
    ),
]


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES]
)
def test_error_messages(case, tmp_path, request, capsys):
    action = case.action
    if action == "uci_corrupt":
        action = partial(uci, corrupt=True, root=request.getfixturevalue("uci_root"))
    with pytest.raises(case.error) as info:
        action(tmp_path)
    message = str(info.value)
    if case.error is SystemExit:  # argparse-style errors go to stderr
        assert info.value.code == 2
        message = capsys.readouterr().err
    for part in (case.argument, case.given, case.expected):
        assert part in message, f"{part!r} not in: {message}"


def test_table_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


def test_non_finite_loss_stops_training_naming_step_and_epoch():
    """A target of 1e20 is finite in float32, but its squared error overflows: the third
    training batch of the second epoch (batches in order: no shuffling)."""
    seed_everything(0)
    x, y = arrays(64)
    loader_x, loader_y = x, with_value(y, 40, 1e20)  # batch 2 of 4

    class InOrder(ArrayDataModule):
        def train_dataloader(self):
            loader = super().train_dataloader()
            loader.shuffle = False
            return loader

    dm = InOrder(loader_x, loader_y, batch_size=16)
    method = DeterministicRegression(mlp(1))
    with pytest.raises(FloatingPointError, match=r"non-finite training loss \(inf\)") as info:
        trainer(max_epochs=1, limit_val_batches=0).fit(method, dm)
    assert "at epoch 0, step 2 (batch 2)" in str(info.value)
