"""Shared test helpers (tests/ is on sys.path through its conftest)."""

import json
import math
import sys
from pathlib import Path

from lightning import Trainer


def quiet_trainer(**extra) -> Trainer:
    """A Trainer without logger, checkpoints, progress bar or model summary."""
    return Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **extra,
    )


REPO = Path(__file__).parents[1]


def fit_config(config: str, tmp_path: Path, monkeypatch, *overrides: str) -> tuple[object, dict]:
    """Run ``uq-box fit --config configs/<config>`` into ``tmp_path``; return (model, metrics).

    ``overrides`` are extra CLI arguments (``--trainer.max_epochs=3``, ...). The test metrics are
    read back from the run's ``test_metrics.json`` and checked to be finite.
    """
    from uq_box import cli

    monkeypatch.setattr(sys, "argv", ["uq-box"])
    fitted = {}
    original = cli.UQBoxCLI.after_fit

    def after_fit(self):
        original(self)
        fitted["model"] = self.model

    monkeypatch.setattr(cli.UQBoxCLI, "after_fit", after_fit)
    cli.main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / config),
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_model_summary=false",
            *overrides,
        ]
    )
    (path,) = tmp_path.glob("*/version_*/test_metrics.json")
    metrics = json.loads(path.read_text())
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    return fitted["model"], metrics
