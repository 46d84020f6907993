"""Shared test helpers (tests/ is on sys.path through its conftest)."""

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
