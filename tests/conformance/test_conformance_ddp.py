"""``N`` under DDP for every entry of the registry that trains (``uq_box.methods.registry``).

One script (run in a subprocess; Lightning's ``ddp`` launcher starts rank 1 by running it again)
fits each entry for one epoch on 2 CPU processes, 8 points per process and step, and records on
every rank what the method reads as ``num_training_points`` (the ``N`` of the ELBO and of the
posterior's scale), the training inputs the rank drew and a fingerprint of the weights. Checked:
``N`` is the whole training set (64), not the rank's share (32); the ranks draw disjoint halves
that together are the training set; both ranks end with the same weights.

The quality of DDP fits (same metrics as one process) is in
``tests/reliability/test_reliability_ddp.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conformance_cases import N_TRAIN, NUM_CLASSES, params

from uq_box.methods.registry import METHODS

SCRIPT = textwrap.dedent(
    f"""
    import json, sys
    from pathlib import Path

    import torch
    from lightning import Callback, Trainer, seed_everything

    from uq_box.datamodules import ArrayDataModule, StackedDataModule
    from uq_box.methods.registry import entry
    from uq_box.models import MLP

    torch.set_num_threads(1)
    out, names = Path(sys.argv[1]), sys.argv[2:]
    N_TRAIN, NUM_CLASSES = {N_TRAIN}, {NUM_CLASSES}


    def arrays(seed):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(N_TRAIN + 16, 2, generator=generator)
        y = torch.sin(x[:, :1]) + 0.1 * torch.randn(len(x), 1, generator=generator)
        labels = torch.bucketize(x[:, 0], torch.tensor([-0.4, 0.4]))
        return x, y, labels


    def data(item, seed=0):
        if item.stacked:
            return StackedDataModule([data(item.base, k) for k in range(item.num_runs)])
        x, y, labels = arrays(seed)
        t = y if item.task == "regression" else labels
        if item.task == "binary":  # labels in {{0, 1}}: [N], or [N, L] for multilabel
            t = (x[:, :1] > torch.linspace(-0.5, 0.5, item.num_labels or 1)).long()
            t = t[:, 0] if item.num_labels is None else t
        n = N_TRAIN
        return ArrayDataModule(x[:n], t[:n], x[n:], t[n:], batch_size=8, seed=0)


    class Record(Callback):
        def on_train_start(self, trainer, pl_module):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            x = batch["input"]
            self.seen.append((x[0] if x.ndim == 3 else x)[:, 0])

        def on_train_end(self, trainer, pl_module):
            method = pl_module.method if hasattr(pl_module, "runs") else pl_module
            self.num_training_points = method.num_training_points


    for name in names:
        item = entry(name)
        seed_everything(0)
        dropout = 0.2 if item.leaf.dropout else 0.0
        width = item.width(NUM_CLASSES)
        method = item.build(MLP(2, [8], width, dropout_p=dropout, batch_norm=item.leaf.batch_norm))
        record = Record()
        trainer = Trainer(
            strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
        )
        trainer.fit(method, data(item))
        weights = [p.detach().double().sum().item() for p in method.parameters()]
        result = {{
            "world_size": trainer.world_size,
            "num_training_points": record.num_training_points,
            "inputs": torch.cat(record.seen).tolist(),
            "weights": weights,
        }}
        (out / f"{{name}}_rank{{trainer.global_rank}}.json").write_text(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Run the DDP script once over every entry (Laplace's where the extra is installed)."""
    try:
        import laplace  # noqa: F401

        names = [e.name for e in METHODS if e.ddp]
    except ImportError:
        names = [e.name for e in METHODS if e.ddp and not e.laplace]
    out = tmp_path_factory.mktemp("ddp_conformance")
    (out / "train_ddp.py").write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(out / "train_ddp.py"), str(out), *names],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return out


@pytest.mark.parametrize("item", params(lambda e: e.ddp))
def test_ddp_global_training_set_size(item, ddp_run):
    ranks = [json.loads((ddp_run / f"{item.name}_rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world_size"] == 2
        assert rank["num_training_points"] == N_TRAIN
        assert len(rank["inputs"]) == N_TRAIN // 2
    seen = [sorted(rank["inputs"]) for rank in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(_script_inputs().tolist())  # (run 0's)
    # gradients are averaged over the ranks: both end with the same weights
    assert ranks[0]["weights"] == pytest.approx(ranks[1]["weights"], rel=1e-6, abs=1e-7)


def _script_inputs() -> torch.Tensor:
    """Column 0 of the training inputs of the script's ``arrays(0)``."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(N_TRAIN + 16, 2, generator=generator)[:N_TRAIN, 0]
