"""A fit killed with SIGKILL mid-epoch resumes from its last checkpoint to the uninterrupted run.

Three processes run the same script (BNN-VI regression, ``Trainer(deterministic=True)``,
``ModelCheckpoint(every_n_train_steps=5, save_last=True)``, 8 batches per epoch, 4 epochs):

- ``full``: trains without interruption;
- ``killed``: stops still (sleeps) after step 13, i.e. mid-epoch 1 and three steps after the last
  checkpoint (step 10, itself mid-epoch); the test waits for that and sends SIGKILL;
- ``resume``: a new process, ``fit(ckpt_path="last", weights_only=True)``.

The resumed run ends with the parameters and test metrics of the uninterrupted one, bit for bit:
the checkpoint holds the loader's position in its epoch (``InMemoryLoader.state_dict``), Lightning
sets the loader's epoch (``set_epoch``), and the random generators' states come back from the
checkpoint (``UQMethod.on_train_start``), so the Monte Carlo weight noise after the resume is the
noise the uninterrupted run drew.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import torch
    from lightning import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    from uq_box.datamodules import ArrayDataModule
    from uq_box.methods import BNNVIRegression
    from uq_box.models import MLP

    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    STOP_AT_STEP = 13


    class StopStill(Callback):
        # after STOP_AT_STEP: say so, then wait to be killed
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == STOP_AT_STEP:
                (out / "stopped").write_text(f"{trainer.current_epoch} {batch_idx}")
                time.sleep(600)


    generator = torch.Generator().manual_seed(0)
    x = torch.rand(192, 1, generator=generator) * 6 - 3
    y = torch.sin(x) + (0.1 + 0.1 * x.abs()) * torch.randn(192, 1, generator=generator)
    dm = ArrayDataModule(x[:128], y[:128], x[128:160], y[128:160], x[160:], y[160:], batch_size=16)

    seed_everything(0)
    method = BNNVIRegression(
        MLP(1, [16], 2), stochastic_module_names=[-1], num_mc_samples_train=4, num_mc_samples_test=8
    )
    callbacks = [
        ModelCheckpoint(
            dirpath=out / "checkpoints", every_n_train_steps=5, save_top_k=-1, save_last=True
        )
    ]
    if mode == "killed":
        callbacks.append(StopStill())
    trainer = Trainer(
        max_epochs=4,
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    resume = mode == "resume"
    trainer.fit(
        method, dm, ckpt_path="last" if resume else None, weights_only=True if resume else None
    )
    metrics = trainer.test(method, dm, verbose=False)[0]
    torch.save(method.state_dict(), out / "state.pt")
    (out / "metrics.json").write_text(json.dumps(metrics))
    """
)


def launch(script, mode, out):
    """Run the script in ``mode`` writing into ``out``; its output goes to ``out/<mode>.log``."""
    out.mkdir(exist_ok=True)
    log = open(out / f"{mode}.log", "w")  # closed by the test (its `finally`)
    process = subprocess.Popen(
        [sys.executable, str(script), mode, str(out)], stdout=log, stderr=subprocess.STDOUT
    )
    process.log = log
    return process


def tail(process):
    return open(process.log.name).read()[-3000:]


def finish(process, timeout=240):
    process.wait(timeout=timeout)
    assert process.returncode == 0, tail(process)


def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    full = launch(script, "full", tmp_path / "full")
    killed = launch(script, "killed", run)
    resumed = None
    try:
        deadline = time.monotonic() + 240
        while not (run / "stopped").exists():
            assert killed.poll() is None, tail(killed)
            assert time.monotonic() < deadline, "the run never reached step 13"
            time.sleep(0.1)
        assert (run / "checkpoints" / "last.ckpt").exists()
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        assert killed.returncode == -signal.SIGKILL
        # killed in epoch 1 after batch 4 of 8 (step 13); the last checkpoint is step 10 (batch 1)
        assert (run / "stopped").read_text() == "1 4"
        last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert (last["epoch"], last["global_step"]) == (1, 10)
        assert not (run / "metrics.json").exists()

        resumed = launch(script, "resume", run)
        finish(full)
        finish(resumed)
    finally:  # leave no process behind when an assertion fails
        for process in (full, killed, resumed):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
            if process is not None:
                process.log.close()

    expected = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert json.loads((run / "metrics.json").read_text()) == expected
    state_full = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    state_resumed = torch.load(run / "state.pt", weights_only=True)
    assert state_full.keys() == state_resumed.keys()
    different = [k for k in state_full if not torch.equal(state_full[k], state_resumed[k])]
    assert not different, different
