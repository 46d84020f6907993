"""The conformance suite: every entry of the method registry (``uq_box.methods.registry``).

For each entry (a method class on a task, built small on ``MLP(2, [8], width)``), where it
applies:

- the registry lists every concrete method class that ``uq_box.methods`` exports;
- the prediction contract: keys, shapes, dtypes, finite values, ``total^2 = aleatoric^2 +
  epistemic^2`` (regression), ``entropy = aleatoric + epistemic`` and the mean of the sampled
  softmax probabilities (classification), ``epistemic_uct == 0`` for a single network; a batch
  dict predicts as a bare input; float64 inputs into a float32 network give float32 predictions;
- same seed, same numbers: a second fit gives bit-identical parameters, buffers and logs;
- exact resume: a fit resumed from a checkpoint taken mid-epoch (steps 6 and 10 of 12, under
  another global seed) ends with the parameters, buffers, logged epoch means and (sampled,
  same-seed) predictions of the uninterrupted run; Laplace's approximation included;
- ``load_from_checkpoint(path, <fresh modules>, weights_only=True)`` restores everything a
  prediction needs: same seed, same predictions;
- the shared bad-input table (``conformance_cases.bad_inputs``): a network output width that
  does not fit, zero counts, a negative burn-in, a post-hoc wrapper around a method of the other
  task; each message names the argument, the value and the expectation;
- ``uq-box fit ... --trainer.fast_dev_run=true`` of a config built from the entry.

``N`` under DDP is in ``test_conformance_ddp.py``, the backbone table in
``test_conformance_backbones.py``. Laplace's entries run in ``.venv-laplace``
(``pytest -m laplace tests/conformance``).
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import yaml
from conformance_cases import (
    CHECKPOINT_EVERY,
    N_PREDICT,
    assert_same_predictions,
    assert_same_state,
    bad_input_params,
    check_contract,
    fit,
    network,
    params,
    predict,
    predict_inputs,
    state_of,
)
from lightning.pytorch.callbacks import ModelCheckpoint

import uq_box.methods
from uq_box.methods.registry import METHODS, entry, is_concrete_method

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")


@pytest.fixture(autouse=True)
def _restore_deterministic_flag():
    """``Trainer(deterministic=True)`` switches torch's flag on for the whole process."""
    previous = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """``fitted(entry)``: the entry fitted once per module, with a checkpoint every 2 steps."""
    cache = {}

    def get(item):
        if item.name not in cache:
            folder = tmp_path_factory.mktemp(item.name.replace("[", "_").replace("]", ""))
            steps = ModelCheckpoint(
                dirpath=folder,
                filename="{step}",
                every_n_train_steps=CHECKPOINT_EVERY,
                save_top_k=-1,
            )
            done = fit(item, callbacks=[steps] if item.trains else [])
            done.folder = folder
            cache[item.name] = done
        return cache[item.name]

    return get


# -- the registry ---------------------------------------------------------------------------------
def test_every_exported_method_class_has_an_entry():
    exported = {
        name for name in uq_box.methods.__all__ if is_concrete_method(getattr(uq_box.methods, name))
    }
    registered = {item.cls.__name__ for item in METHODS}
    assert not exported - registered, f"not in uq_box.methods.registry: {exported - registered}"
    # the family bases (no task) are not concrete; everything else is
    assert {"UQMethod", "BNNVI", "SWAG", "PostHocCalibration"}.isdisjoint(exported)
    assert {"StackedRuns", "SGHMCClassification", "TemperatureScaling"} <= exported
    assert len({item.name for item in METHODS}) == len(METHODS)
    assert entry("MVERegression").cls is uq_box.methods.MVERegression
    with pytest.raises(KeyError, match="no registry entry 'MVE'"):
        entry("MVE")


# -- the prediction contract ----------------------------------------------------------------------
@pytest.mark.parametrize("item", params())
def test_prediction_contract(item, fitted):
    method = fitted(item).method
    x = predict_inputs(item)
    torch.manual_seed(3)
    preds = predict(method, item, x)
    check_contract(preds, item, N_PREDICT)
    if not item.stacked:  # a batch (dict with targets) predicts as its inputs
        torch.manual_seed(3)
        assert_same_predictions(preds, method.predict_step({"input": x, "target": None}))


@pytest.mark.parametrize("item", params(lambda e: e.task == "regression" and not e.stacked))
def test_quantiles_on_request(item, fitted):
    """``quantile_levels`` adds ``quantiles`` ``[N, T, Q]`` to the contract, increasing in the
    level; a level outside (0, 1) is an error naming the argument."""
    method = fitted(item).method
    previous = method.quantile_levels
    try:
        method.quantile_levels = (0.1, 0.5, 0.9)
        torch.manual_seed(3)
        preds = predict(method, item, predict_inputs())
        check_contract(preds, item, N_PREDICT)
        assert "quantiles" in preds, (
            f"{item.name} ignores `quantile_levels`: add preds['quantiles'] [N, T, Q] (see "
            f"uq_box.methods.predictive.regression_quantiles, "
            f"uq_box.metrics.functional_quantiles.gaussian_quantiles)"
        )
        assert preds["quantiles"].shape == (N_PREDICT, 1, 3)
        assert (preds["quantiles"][..., 0] < preds["quantiles"][..., 2]).all()
    finally:
        method.quantile_levels = previous
    with pytest.raises(ValueError, match="`quantile_levels`"):
        method.quantile_levels = (0.5, 1.0)


#: known failures of the float64-input check, each with its reason
@pytest.mark.parametrize("item", params())
def test_float64_inputs_into_a_float32_network(item, fitted):
    """Floating point inputs are cast to the network's dtype: float32 predictions, the same
    numbers as the float32 inputs give."""
    method = fitted(item).method
    x = predict_inputs(item)
    torch.manual_seed(3)
    preds = predict(method, item, x)
    torch.manual_seed(3)
    from_double = predict(method, item, x.double())
    for key, value in preds.items():
        assert from_double[key].dtype == value.dtype, key
        assert value.dtype in (torch.float32, torch.bool), (key, value.dtype)
        torch.testing.assert_close(from_double[key], value, msg=key)


# -- checkpoints: same seed same numbers, exact resume, reload ------------------------------------
@pytest.mark.parametrize("item", params(lambda e: e.resumes))
def test_same_seed_same_numbers_and_exact_resume(item, fitted):
    reference = fitted(item)
    state = state_of(reference.method)
    x = predict_inputs(item)
    torch.manual_seed(3)
    expected = predict(reference.method, item, x)

    again = fit(item)
    assert_same_state(state, state_of(again.method))
    assert again.logged == reference.logged

    # resume mid-epoch (steps 6 and 10: batch 2 of 4 in epochs 1 and 2) under another seed;
    # the logged epoch means (and a mean-only network's noise estimate) cover whole epochs
    for step in (6, 10):
        resumed = fit(item, seed=1, ckpt_path=reference.folder / f"step={step}.ckpt")
        assert_same_state(state, state_of(resumed.method))
        assert resumed.logged == reference.logged
        torch.manual_seed(3)
        assert_same_predictions(expected, predict(resumed.method, item, x))


@pytest.mark.parametrize("item", params())
def test_load_from_checkpoint_predicts_the_same(item, fitted, tmp_path):
    reference = fitted(item)
    method = reference.method
    reference.trainer.save_checkpoint(tmp_path / "final.ckpt")
    loaded = type(method).load_from_checkpoint(
        tmp_path / "final.ckpt", **item.objects(network(item)), weights_only=True
    )
    assert_same_state(state_of(method), state_of(loaded))
    x = predict_inputs(item)
    torch.manual_seed(3)
    expected = predict(method, item, x)
    torch.manual_seed(3)
    assert_same_predictions(expected, predict(loaded, item, x))


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("item", "case"), bad_input_params())
def test_bad_input(item, case):
    with pytest.raises(case.error) as info:
        case.action()
    message = str(info.value)
    for part in case.parts:
        assert part in message, f"{part!r} not in: {message}"


# -- the CLI --------------------------------------------------------------------------------------
def cli_config(item) -> dict:
    """A config of the entry on the toy data (1 input) or two moons (2 inputs, 2 classes)."""
    if item.dense:
        return dense_cli_config(item)
    regression = item.task == "regression"
    backbone = {
        "n_inputs": 1 if regression else 2,
        "n_hidden": [8],
        "n_outputs": item.width(2),
        "dropout_p": 0.2 if item.dropout else 0.0,
        **({"batch_norm": True} if item.batch_norm else {}),
    }
    data = "ToyHeteroscedasticDatamodule" if regression else "TwoMoonsDatamodule"
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False},
        "model": {
            "class_path": f"uq_box.methods.{item.cls.__name__}",
            "init_args": {
                "model": {"class_path": "uq_box.models.MLP", "init_args": backbone},
                **item.kwargs,
            },
        },
        "data": {
            "class_path": f"uq_box.datamodules.{data}",
            "init_args": {"n_points": 64, "n_test": 32, "batch_size": 16},
        },
    }


def dense_cli_config(item) -> dict:
    """A config of a dense entry: a tiny U-Net on the toy segmentation (3 classes) or pixel
    regression data, 8x8 images."""
    task = "Segmentation" if item.task == "segmentation" else "PixelRegression"
    backbone = {
        "in_channels": 1,
        "out_channels": item.width(3),
        "depth": 1,
        "width": 4,
        "dropout_p": 0.2 if item.dropout else 0.0,
    }
    sizes = {"n_train": 32, "n_val": 16, "n_test": 16, "image_size": 8, "batch_size": 16}
    return {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "logger": False},
        "model": {
            "class_path": f"uq_box.methods.{item.cls.__name__}",
            "init_args": {
                "model": {"class_path": "uq_box.models.UNet", "init_args": backbone},
                **item.kwargs,
            },
        },
        "data": {"class_path": f"uq_box.datamodules.Toy{task}Datamodule", "init_args": sizes},
    }


@pytest.mark.parametrize("item", params(lambda e: e.cli))
def test_cli_fast_dev_run(item, tmp_path, capsys, monkeypatch):
    """One batch of each stage through ``uq-box fit``: the entry's class with its arguments,
    finite test metrics, the report built, nothing written."""
    from uq_box import cli

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cli_config(item)))
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    monkeypatch.setattr(sys, "argv", ["uq-box"])
    seen = {}
    after_fit = cli.UQBoxCLI.after_fit
    monkeypatch.setattr(
        cli.UQBoxCLI, "after_fit", lambda self: (seen.update(model=self.model), after_fit(self))
    )
    cli.main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            "--trainer.enable_model_summary=false",
        ]
    )
    model = seen["model"]
    assert type(model) is item.cls
    for key, value in item.kwargs.items():
        if key in model.hparams:  # (a prior is a module argument, not a hyperparameter)
            assert model.hparams[key] == value, key
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("test metrics: ")]
    metrics = dict(part.split("=") for part in line[len("test metrics: ") :].split(", "))
    assert metrics and all(math.isfinite(float(v)) for v in metrics.values()), line
    assert ("test_accuracy" in metrics) == (item.task in ("classification", "binary"))
    assert "fast_dev_run: report built (" in out, out
    assert list(run.iterdir()) == []
