"""Checkpoints, resuming and reproducibility of every method (issue #6).

For each method, on small data (4 training batches per epoch, 3 epochs, ``deterministic=True``):

- same seed, same numbers: a second run gives bit-identical parameters, buffers and test metrics;
- resuming a fit from a checkpoint taken mid-epoch (``fit(ckpt_path=...)``, under another global
  seed) ends with the parameters, buffers (ensemble members, SWAG moments, SG-MCMC samples) and test
  metrics of the uninterrupted run, and logs the same epoch means: the data loader resumes its
  epoch's permutation and skips the batches already drawn, and the random generators' states and
  the epoch's running sums come back from the checkpoint;
- ``load_from_checkpoint(path, model=<fresh backbone>, weights_only=True)`` restores everything a
  prediction needs: the same seed gives the same predictions (nothing pickled blocks
  ``weights_only``);
- the post-hoc wrappers (conformal regression, temperature scaling) round-trip as well;
- Laplace (the `laplace` extra) resumes mid-epoch to the uninterrupted fit, Laplace approximation
  included.

The killed-process variant (SIGKILL mid-epoch, resume in a new process) is in
``test_reliability_resume_kill.py``.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_cases import (
    METHOD_IDS,
    METHODS,
    MethodCase,
    assert_same_predictions,
    assert_same_state,
    datamodule,
    mlp,
    state_of,
    toy_arrays,
)

from uq_box.methods import (
    ConformalRegression,
    DeepEnsembleRegression,
    DeterministicClassification,
    MVERegression,
    QuantileRegression,
    SWAGRegression,
    TemperatureScaling,
)
from uq_box.methods.base import METHOD_STATE_KEY, OWNED_HOOKS, RESUME_STATE_KEY
from uq_box.methods.laplace import LaplaceClassification, LaplaceRegression, _plain_state

pytestmark = pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")

EPOCHS = 3
CHECKPOINT_EVERY = 2  # steps 2, 4 (last batch of epoch 0), 6 (mid-epoch 1), ...


@pytest.fixture(autouse=True)
def _restore_deterministic_flag():
    """``Trainer(deterministic=True)`` switches torch's flag on for the whole process."""
    previous = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(previous)


def trainer(**extra) -> Trainer:
    extra.setdefault("enable_checkpointing", False)
    extra.setdefault("max_epochs", EPOCHS)
    return Trainer(
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def fit_and_test(case, seed=0, ckpt_path=None, callbacks=()):
    """Fit the method (optionally resuming) and test it; returns (method, test metrics, trainer)."""
    seed_everything(seed)
    method = case.make(case.network())
    dm = datamodule(case.task)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    fit_trainer = trainer(callbacks=list(callbacks), enable_checkpointing=checkpointing)
    fit_trainer.fit(method, dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    metrics = trainer().test(method, dm, verbose=False)[0]
    return method, metrics, fit_trainer


@pytest.mark.parametrize("case", METHODS, ids=METHOD_IDS)
def test_reproducible_resumable_and_reloadable(case, tmp_path):
    steps = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1
    )
    method, metrics, fit_trainer = fit_and_test(case, callbacks=[steps])
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    state = state_of(method)

    # 1. same seed, same numbers
    again, metrics_again, _ = fit_and_test(case)
    assert_same_state(state, state_of(again))
    assert metrics_again == metrics

    # 2. resume mid-epoch (steps 6 and 10: batch 2 of 4 in epochs 1 and 2) under another seed;
    #    the logged epoch means (and a mean-only network's noise estimate) cover whole epochs
    logged = {k: float(v) for k, v in fit_trainer.callback_metrics.items()}
    for step in (6, 10):
        resumed, metrics_resumed, resumed_trainer = fit_and_test(
            case, seed=1, ckpt_path=tmp_path / f"step={step}.ckpt"
        )
        assert_same_state(state, state_of(resumed))
        assert metrics_resumed == metrics
        assert {k: float(v) for k, v in resumed_trainer.callback_metrics.items()} == logged

    # 3. load_from_checkpoint with weights_only=True: same predictions under the same seed
    final = tmp_path / "final.ckpt"
    fit_trainer.save_checkpoint(final)
    loaded = type(method).load_from_checkpoint(final, model=case.network(), weights_only=True)
    assert_same_state(state, state_of(loaded))
    x_test = toy_arrays()[0][-8:]
    torch.manual_seed(3)
    expected = method.predict_step(x_test)
    torch.manual_seed(3)
    assert_same_predictions(expected, loaded.predict_step(x_test))


SWAG_EVERY_EPOCH = MethodCase(
    "SWAGRegression",
    partial(SWAGRegression, max_num_samples=3, num_mc_samples_test=4),  # a snapshot every epoch
    mlp(2),
    "regression",
)
BNNVI = next(case for case in METHODS if case.name == "BNNVIRegression")


@pytest.mark.parametrize("case", [SWAG_EVERY_EPOCH, BNNVI], ids=["SWAG", "BNNVI"])
def test_resume_from_an_epoch_end_checkpoint(case, tmp_path):
    """An epoch-end checkpoint (saved after validation and the epoch-end hooks, e.g. SWAG's
    snapshot) resumes to the uninterrupted run: Lightning calls the loader's ``set_epoch``."""
    epochs = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    method, metrics, _ = fit_and_test(case, callbacks=[epochs])
    resumed, metrics_resumed, _ = fit_and_test(case, seed=1, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_same_state(state_of(method), state_of(resumed))
    assert metrics_resumed == metrics


LAPLACE = [
    MethodCase(
        "LaplaceRegression", partial(LaplaceRegression, num_mc_samples_test=4), mlp(1), "regression"
    ),
    MethodCase(
        "LaplaceClassification",
        partial(LaplaceClassification, num_mc_samples_test=4),
        mlp(2),
        "classification",
    ),
]


def assert_same_laplace(a, b) -> None:
    """Two fitted laplace-torch approximations hold the same state, tensor for tensor."""

    def flat(value, prefix=""):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flat(item, f"{prefix}{key}.")
        elif isinstance(value, tuple | list):
            for i, item in enumerate(value):
                yield from flat(item, f"{prefix}{i}.")
        else:
            yield prefix, value

    left, right = dict(flat(_plain_state(a.state_dict()))), dict(flat(_plain_state(b.state_dict())))
    assert left.keys() == right.keys()
    different = [
        k
        for k in left
        if not (
            torch.equal(left[k], right[k])
            if isinstance(left[k], torch.Tensor)
            else left[k] == right[k]
        )
    ]
    assert not different, f"Laplace states differ: {different}"


@pytest.mark.laplace
@pytest.mark.parametrize("case", LAPLACE, ids=[case.name for case in LAPLACE])
def test_laplace_resumes_to_the_uninterrupted_fit(case, tmp_path):
    """A Laplace fit resumed mid-epoch (``ckpt_path``, another seed) ends as the uninterrupted
    one: the weights, the noise estimate, the logged epoch means, the Laplace approximation fitted
    when training ends, and the (sampled) test predictions, bit for bit."""
    steps = ModelCheckpoint(
        dirpath=tmp_path, filename="{step}", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1
    )
    method, metrics, fit_trainer = fit_and_test(case, callbacks=[steps])
    assert method.la is not None
    logged = {k: float(v) for k, v in fit_trainer.callback_metrics.items()}
    for step in (6, 10):
        resumed, metrics_resumed, resumed_trainer = fit_and_test(
            case, seed=1, ckpt_path=tmp_path / f"step={step}.ckpt"
        )
        assert_same_state(state_of(method), state_of(resumed))
        assert_same_laplace(method.la, resumed.la)
        assert metrics_resumed == metrics
        assert {k: float(v) for k, v in resumed_trainer.callback_metrics.items()} == logged


@pytest.mark.parametrize("hook", sorted(OWNED_HOOKS))
def test_a_method_overriding_an_owned_lightning_hook_is_refused(hook):
    """The base keeps the resume state in Lightning's hooks; a method uses the uq_box hooks."""
    with pytest.raises(TypeError, match=f"overrides Lightning's `{hook}`.*`{OWNED_HOOKS[hook]}`"):
        type("Custom", (SWAGRegression,), {hook: lambda self, *args: None})


def test_extra_checkpoint_state_round_trips_next_to_the_resume_state(tmp_path):
    """A method's extra state goes into checkpoints and comes back before the weights load."""

    class Counting(DeterministicClassification):
        def on_fit_begin(self):
            self.fits = getattr(self, "fits", 0) + 1

        def extra_checkpoint_state(self):
            return {"fits": torch.tensor(self.fits)}

        def load_extra_checkpoint_state(self, state, weights):
            self.fits = None if state is None else int(state["fits"])
            self.weights_seen = set(weights)

    seed_everything(0)
    method = Counting(mlp(2)())
    fit_trainer = trainer(max_epochs=1)
    fit_trainer.fit(method, datamodule("classification"))
    fit_trainer.save_checkpoint(tmp_path / "counting.ckpt")
    checkpoint = torch.load(tmp_path / "counting.ckpt", weights_only=True)
    assert {RESUME_STATE_KEY, METHOD_STATE_KEY} <= set(checkpoint)
    loaded = Counting.load_from_checkpoint(
        tmp_path / "counting.ckpt", model=mlp(2)(), weights_only=True
    )
    assert loaded.fits == 1 and loaded.weights_seen == set(method.state_dict())


def test_ensemble_given_as_a_list_reloads_from_one_fresh_network(tmp_path):
    seed_everything(0)
    method = DeepEnsembleRegression([mlp(2)() for _ in range(3)])
    fit_trainer = trainer(max_epochs=1)
    fit_trainer.fit(method, datamodule("regression"))
    fit_trainer.save_checkpoint(tmp_path / "ensemble.ckpt")
    loaded = DeepEnsembleRegression.load_from_checkpoint(
        tmp_path / "ensemble.ckpt", model=mlp(2)(), weights_only=True
    )
    assert loaded.num_members == 3
    assert_same_state(state_of(method), state_of(loaded))


@pytest.mark.parametrize("base", ["mve", "quantile"])
def test_conformal_wrapper_round_trip(base, tmp_path):
    seed_everything(0)
    make, network = {
        "mve": (MVERegression, mlp(2)),
        "quantile": (QuantileRegression, mlp(3)),
    }[base]
    dm = datamodule("regression")
    fitted = make(network())
    trainer(max_epochs=2).fit(fitted, dm)
    conformal = ConformalRegression(fitted, alpha=0.2)
    calibration_trainer = trainer()
    calibration_trainer.validate(conformal, dataloaders=dm.calib_dataloader(), verbose=False)
    calibration_trainer.save_checkpoint(tmp_path / "conformal.ckpt")
    loaded = ConformalRegression.load_from_checkpoint(
        tmp_path / "conformal.ckpt", model=make(network()), weights_only=True
    )
    assert loaded.is_calibrated and loaded.score == conformal.score
    assert_same_state(state_of(conformal), state_of(loaded))
    assert_same_predictions(conformal.predict_step(dm.X_test), loaded.predict_step(dm.X_test))


def test_temperature_scaling_round_trip(tmp_path):
    seed_everything(0)
    dm = datamodule("classification")
    fitted = DeterministicClassification(mlp(2)())
    trainer(max_epochs=2).fit(fitted, dm)
    scaled = TemperatureScaling(fitted)
    calibration_trainer = trainer()
    calibration_trainer.validate(scaled, datamodule=dm, verbose=False)
    calibration_trainer.save_checkpoint(tmp_path / "temperature.ckpt")
    loaded = TemperatureScaling.load_from_checkpoint(
        tmp_path / "temperature.ckpt",
        model=DeterministicClassification(mlp(2)()),
        weights_only=True,
    )
    assert loaded.is_calibrated
    assert loaded.temperature == scaled.temperature
    assert_same_predictions(scaled.predict_step(dm.X_test), loaded.predict_step(dm.X_test))


def test_loader_resumes_its_epoch_and_position():
    """The loader alone: ``set_epoch`` picks the permutation, ``state_dict`` its position."""
    from uq_box.datamodules import InMemoryLoader

    x = torch.arange(20.0).reshape(-1, 1)

    def loader():
        return InMemoryLoader(x, x, batch_size=4, shuffle=True, seed=7)

    reference = loader()
    passes = [[b["input"].reshape(-1).tolist() for b in reference] for _ in range(3)]
    assert passes[0] != passes[1]

    fresh = loader()
    fresh.set_epoch(2)  # as Lightning does before epoch 2 of a resumed run
    assert [b["input"].reshape(-1).tolist() for b in fresh] == passes[2]

    interrupted = loader()
    interrupted.set_epoch(1)
    batches = iter(interrupted)
    drawn = [next(batches)["input"].reshape(-1).tolist() for _ in range(2)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    rest = [b["input"].reshape(-1).tolist() for b in resumed]
    assert drawn + rest == passes[1]
    # the next pass is a whole epoch again
    assert [b["input"].reshape(-1).tolist() for b in resumed] == passes[2]
