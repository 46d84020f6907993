"""``Trainer(strategy="ddp", accelerator="cpu", devices=2)`` trains BNN-VI, MC dropout and a deep
ensemble as well as one process does.

One script (run in a subprocess; Lightning's ``ddp`` launcher starts rank 1 by running it again)
fits the three methods on 2 processes with 16 points per process and step, and records on every
rank:

- ``num_training_points`` (the ``N`` of the ELBO) is the full training set size, 256, not the
  rank's share: ``InMemoryLoader.num_samples`` is the global size;
- the points each rank draws per epoch: 128 each, disjoint, together the training set;
- the logged metrics: both ranks hold the same numbers (synchronized), and the test metrics equal
  those of the saved model tested in one process on the whole test set.

The same fits in one process with 32 points per step (the same global batch and steps) reach the
same test NLL within a tolerance (the ensemble, which draws no noise, the same numbers).

Also (one process, fast): a validation metric and a loss term of the same name (``val_nll``: the
predictive NLL vs the criterion's mean over samples; ``val_rmse``; quantile ``val_pinball``) are
logged once, as the metric. Logged twice in one hook, Lightning averaged the two values, and under
DDP (different ``sync_dist``) refused them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from lightning import Trainer, seed_everything

from uq_box.datamodules import ArrayDataModule
from uq_box.methods import BNNVIRegression, QuantileRegression
from uq_box.models import MLP

EPOCHS = 40
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch
    from lightning import Callback, Trainer, seed_everything

    from ddp_setup import EPOCHS, METHODS, datamodule

    torch.set_num_threads(1)
    out = Path(sys.argv[1])


    class Record(Callback):
        # N as the method reads it, and the training inputs this rank draws in each epoch
        def on_train_epoch_start(self, trainer, pl_module):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append(batch["input"].reshape(-1))

        def on_train_epoch_end(self, trainer, pl_module):
            self.per_epoch.append(int(sum(len(s) for s in self.seen)))
            if trainer.current_epoch == 0:
                self.first_epoch = torch.cat(self.seen).tolist()

        def on_train_start(self, trainer, pl_module):
            self.per_epoch = []

        def on_train_end(self, trainer, pl_module):
            self.num_training_points = pl_module.num_training_points


    for name, make in METHODS.items():
        seed_everything(0)
        method = make()
        record = Record()
        trainer = Trainer(
            strategy="ddp",
            accelerator="cpu",
            devices=2,
            max_epochs=EPOCHS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[record],
        )
        trainer.fit(method, datamodule(batch_size=16))
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        test_metrics = trainer.test(method, datamodule(batch_size=16), verbose=False)[0]
        rank = trainer.global_rank
        if rank == 0:
            torch.save(method.state_dict(), out / f"{name}.pt")
        result = {
            "noise_std": float(getattr(method, "noise_std", float("nan"))),
            "world_size": trainer.world_size,
            "num_training_points": record.num_training_points,
            "points_per_epoch": record.per_epoch,
            "first_epoch_inputs": record.first_epoch,
            "fit_metrics": fit_metrics,
            "test_metrics": test_metrics,
        }
        (out / f"{name}_rank{rank}.json").write_text(json.dumps(result))
    """
)

SETUP = textwrap.dedent(
    f"""
    import torch
    from uq_box.datamodules import ArrayDataModule
    from uq_box.methods import (
        BNNVIRegression, DeepEnsembleRegression, DeterministicRegression, MCDropoutRegression,
    )
    from uq_box.models import MLP

    EPOCHS = {EPOCHS}
    N_TRAIN, N_VAL, N_TEST = 256, 64, 256


    def datamodule(batch_size):
        generator = torch.Generator().manual_seed(0)
        n = N_TRAIN + N_VAL + N_TEST
        x = torch.rand(n, 1, generator=generator) * 6 - 3
        y = torch.sin(x) + (0.05 + 0.1 * x.abs()) * torch.randn(n, 1, generator=generator)
        a, b = N_TRAIN, N_TRAIN + N_VAL
        return ArrayDataModule(
            x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:], batch_size=batch_size, seed=0
        )


    def optimizer(params):
        return torch.optim.Adam(params, lr=1e-2)


    METHODS = {{
        "bnn_vi": lambda: BNNVIRegression(
            MLP(1, [32], 2), optimizer=optimizer, stochastic_module_names=[-1],
            num_mc_samples_train=4, num_mc_samples_test=16, burnin_epochs=5,
        ),
        "mc_dropout": lambda: MCDropoutRegression(
            MLP(1, [32], 2, dropout_p=0.1), optimizer=optimizer, num_mc_samples_test=16,
            burnin_epochs=5,
        ),
        "deep_ensemble": lambda: DeepEnsembleRegression(
            MLP(1, [32], 2), optimizer=optimizer, num_members=3, burnin_epochs=5
        ),
        # mean-only: its noise estimate is the training RMSE, which must agree across processes
        "deterministic": lambda: DeterministicRegression(MLP(1, [32], 1), optimizer=optimizer),
    }}
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run the DDP script once; returns (folder, setup module)."""
    out = tmp_path_factory.mktemp("ddp")
    (out / "ddp_setup.py").write_text(SETUP)
    (out / "train_ddp.py").write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(out / "train_ddp.py"), str(out)],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    sys.path.insert(0, str(out))
    try:
        import ddp_setup
    finally:
        sys.path.remove(str(out))
    return out, ddp_setup


def quiet(**extra):
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


def test_ddp_mean_only_noise_estimate_agrees_across_processes(ddp_run):
    out, _ = ddp_run
    ranks = [json.loads((out / f"deterministic_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["noise_std"] == ranks[1]["noise_std"]
    assert ranks[0]["noise_std"] == pytest.approx(ranks[0]["fit_metrics"]["train_rmse"])
    assert ranks[0]["test_metrics"] == ranks[1]["test_metrics"]


@pytest.mark.parametrize("name", ["bnn_vi", "mc_dropout", "deep_ensemble"])
def test_ddp_two_processes(name, ddp_run):
    out, setup = ddp_run
    ranks = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in (0, 1)]
    dm = setup.datamodule(batch_size=32)

    # N of the ELBO is the whole training set on both ranks; each draws half of it per epoch
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["num_training_points"] == setup.N_TRAIN
        assert rank["points_per_epoch"] == [setup.N_TRAIN // 2] * setup.EPOCHS
    seen = [sorted(rank["first_epoch_inputs"]) for rank in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(dm.X_train.reshape(-1).tolist())

    # synchronized metrics: the same numbers on both ranks ...
    assert ranks[0]["fit_metrics"] == ranks[1]["fit_metrics"]
    assert ranks[0]["test_metrics"] == ranks[1]["test_metrics"]
    # ... and the test metrics of the whole test set: the DDP model tested in one process
    seed_everything(0)
    ddp_model = setup.METHODS[name]()
    ddp_model.load_state_dict(torch.load(out / f"{name}.pt", weights_only=True))
    ddp_model.num_mc_samples_test = 1000  # enough samples for the Monte Carlo noise to vanish
    single_test = quiet().test(ddp_model, dm, verbose=False)[0]
    ddp_test = ranks[0]["test_metrics"]
    # an ensemble predicts without Monte Carlo noise: the same numbers up to rounding
    tolerance = (
        {"rmse": 1e-5, "nll": 1e-5} if name == "deep_ensemble" else {"rmse": 0.01, "nll": 0.05}
    )
    assert ddp_test["test_rmse"] == pytest.approx(single_test["test_rmse"], abs=tolerance["rmse"])
    assert ddp_test["test_nll"] == pytest.approx(single_test["test_nll"], abs=tolerance["nll"])

    # the same fit in one process (same global batch): the same quality
    seed_everything(0)
    single = setup.METHODS[name]()
    quiet(max_epochs=setup.EPOCHS).fit(single, dm)
    single_metrics = quiet().test(single, dm, verbose=False)[0]
    # (an ensemble draws no noise: averaging the ranks' gradients is the one-process gradient)
    close = {"nll": 1e-4, "rmse": 1e-4} if name == "deep_ensemble" else {"nll": 0.15, "rmse": 0.05}
    assert ddp_test["test_nll"] == pytest.approx(single_metrics["test_nll"], abs=close["nll"])
    assert ddp_test["test_rmse"] == pytest.approx(single_metrics["test_rmse"], abs=close["rmse"])
    # both learned the curve: predicting the targets' marginal N(0, 0.7^2) gives NLL 1.07
    assert max(ddp_test["test_nll"], single_metrics["test_nll"]) < 0.3


@pytest.mark.parametrize("name", ["bnn_vi", "quantile"])
def test_validation_metrics_are_logged_once_as_the_metric(name):
    seed_everything(0)
    if name == "bnn_vi":
        method = BNNVIRegression(MLP(1, [16], 2), num_mc_samples_train=4, num_mc_samples_test=4)
        shared = ("nll", "rmse")
    else:
        method = QuantileRegression(MLP(1, [16], 3))
        shared = ("rmse", "pinball")
    computed = {}
    log_metrics = method._log_metrics

    def spy(metrics, stage):  # the metrics' values before `_log_metrics` resets them
        computed.update({k: float(m.compute()) for k, m in metrics.items() if m.update_called})
        log_metrics(metrics, stage)

    method._log_metrics = spy
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(96, 1, generator=generator) * 6 - 3
    y = torch.sin(x) + 0.2 * torch.randn(96, 1, generator=generator)
    dm = ArrayDataModule(x[:64], y[:64], x[64:], y[64:], batch_size=16)
    trainer = quiet(max_epochs=1, num_sanity_val_steps=0)
    trainer.fit(method, dm)
    for key in shared:
        assert float(trainer.callback_metrics[f"val_{key}"]) == computed[key], key
