"""Two-moons far-field test of the single-pass methods beside MC dropout and deep ensembles.

Each method is fitted on ``TwoMoonsDatamodule(n_points=500)`` (30 epochs, Adam lr 3e-3, an
``MLP(2, [128], 2)``, dropout 0.1 for MC dropout) and scored on the two-moons test points
(in-distribution) and ``FarCloudDatamodule`` (OOD, a cloud around (4, 3)); the table gives the
OOD AUROC of each uncertainty (higher = more OOD) and the test accuracy, for three seeds.
Run: ``.venv/bin/python benchmarks/single_pass_two_moons.py`` (about a minute on one CPU core).
The figures of docs/user-guide/single-pass.md come from it.
"""

from __future__ import annotations

from functools import partial

import pandas as pd
import torch
from lightning import Trainer, seed_everything

from uq_box.datamodules import TwoMoonsDatamodule
from uq_box.datamodules.ood import FarCloudDatamodule
from uq_box.methods import (
    DDUClassification,
    DeepEnsembleClassification,
    DeterministicClassification,
    DUEClassification,
    MCDropoutClassification,
    SNGPClassification,
)
from uq_box.metrics.functional_ood import ood_detection_metrics
from uq_box.models import MLP

EPOCHS = 30
OPTIMIZER = partial(torch.optim.Adam, lr=3e-3)


def methods() -> dict:
    return {
        "deterministic": lambda: DeterministicClassification(MLP(2, [128], 2), optimizer=OPTIMIZER),
        "MC dropout (p=0.1, 50 masks)": lambda: MCDropoutClassification(
            MLP(2, [128], 2, dropout_p=0.1), optimizer=OPTIMIZER, num_mc_samples_test=50
        ),
        "deep ensemble (5)": lambda: DeepEnsembleClassification(
            MLP(2, [128], 2), optimizer=OPTIMIZER, num_members=5
        ),
        "SNGP (D=512)": lambda: SNGPClassification(
            MLP(2, [128], 2), optimizer=OPTIMIZER, num_features=512
        ),
        "DDU": lambda: DDUClassification(MLP(2, [128], 2), optimizer=OPTIMIZER),
        "DUE (M=20)": lambda: DUEClassification(MLP(2, [128], 2), optimizer=OPTIMIZER),
    }


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def run(seed: int) -> list[dict]:
    rows = []
    data = TwoMoonsDatamodule(n_points=500, n_test=500, batch_size=64, seed=seed)
    x_in, y_in = data.split("test")
    x_out = FarCloudDatamodule(seed=seed).split("test")[0]
    for name, build in methods().items():
        seed_everything(seed)
        method = build()
        Trainer(
            max_epochs=EPOCHS,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(method, data)
        p_in, p_out = method.predict_step(x_in), method.predict_step(x_out)
        scores = {"total (entropy)": "pred_uct", "epistemic_uct": "epistemic_uct"}
        scores.update({k: k for k in ("logit_var", "density_score") if k in p_in})
        row = {"method": name, "seed": seed}
        row["accuracy"] = float((p_in["pred"].argmax(-1) == y_in).float().mean())
        for label, key in scores.items():
            row[label] = float(ood_detection_metrics(p_in[key], p_out[key])["auroc"])
        if "pred_mean_field" in p_in:
            m_in, m_out = entropy(p_in["pred_mean_field"]), entropy(p_out["pred_mean_field"])
            row["mean-field entropy"] = float(ood_detection_metrics(m_in, m_out)["auroc"])
        rows.append(row)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows = [row for seed in range(3) for row in run(seed)]
    table = pd.DataFrame(rows).groupby("method", sort=False).mean(numeric_only=True)
    print(table.drop(columns="seed").round(3).to_string())


if __name__ == "__main__":
    main()
