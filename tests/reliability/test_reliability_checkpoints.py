"""Checkpoint and resume machinery beyond the conformance suite (issue #6).

Every registry entry's same-seed reproducibility, mid-epoch resume and ``load_from_checkpoint``
round trip (post-hoc wrappers and Laplace included) are in ``tests/conformance``. Here: resuming
from an epoch-end checkpoint, Lightning hooks the base owns, a method's extra checkpoint state, an
ensemble given as a list, and the loader's own resume state. The killed-process variant (SIGKILL
mid-epoch, resume in a new process) is in ``test_reliability_resume_kill.py``.
"""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from reliability_cases import assert_same_state, datamodule, mlp, state_of

from uq_box.methods import DeepEnsembleRegression, DeterministicClassification, SWAGRegression
from uq_box.methods.base import METHOD_STATE_KEY, OWNED_HOOKS, RESUME_STATE_KEY
from uq_box.methods.registry import entry

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
    """Fit ``case = (registry entry, overrides)`` (optionally resuming) and test it; returns
    (method, test metrics, trainer)."""
    seed_everything(seed)
    item, overrides = case
    method = item.build(mlp(item.width(2))(), **overrides)
    dm = datamodule(item.task)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    fit_trainer = trainer(callbacks=list(callbacks), enable_checkpointing=checkpointing)
    fit_trainer.fit(method, dm, ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    metrics = trainer().test(method, dm, verbose=False)[0]
    return method, metrics, fit_trainer


EPOCH_END_CASES = {
    "SWAG": (entry("SWAGRegression"), {"burnin_epochs": 0}),  # a snapshot every epoch
    "BNNVI": (entry("BNNVIRegression"), {}),
}


@pytest.mark.parametrize("case", list(EPOCH_END_CASES.values()), ids=list(EPOCH_END_CASES))
def test_resume_from_an_epoch_end_checkpoint(case, tmp_path):
    """An epoch-end checkpoint (saved after validation and the epoch-end hooks, e.g. SWAG's
    snapshot) resumes to the uninterrupted run: Lightning calls the loader's ``set_epoch``."""
    epochs = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    method, metrics, _ = fit_and_test(case, callbacks=[epochs])
    resumed, metrics_resumed, _ = fit_and_test(case, seed=1, ckpt_path=tmp_path / "epoch=0.ckpt")
    assert_same_state(state_of(method), state_of(resumed))
    assert metrics_resumed == metrics


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
