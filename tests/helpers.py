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


# -- vectorized == loop, for the deep ensemble and the parameter-sampling methods -------------------
def _state_of(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def loop_outputs(method, x, theta=None):
    """The reference: one plain forward per member or per fixed parameter sample, eval mode."""
    import copy

    import torch
    from torch.func import functional_call

    with torch.no_grad():
        if theta is None:  # the ensemble
            ensemble = method.model
            return torch.stack([ensemble.member(i).eval()(x) for i in range(ensemble.num_members)])
        model = copy.deepcopy(method.model).eval()
        return torch.stack([functional_call(model, method.unflatten(t), (x,)) for t in theta])


def check_vectorized_equals_loop(method, x, atol):
    """``predict_step`` (vmap) against the loop, the parameter samples fixed; returns it."""
    import torch

    from uq_box.methods.deep_ensemble import DeepEnsemble

    theta = None
    if not isinstance(method, DeepEnsemble):
        theta = method.sample_parameters(method.num_mc_samples_test)
        # fixed: predict_step gets these samples, and the loop runs them one by one
        method.sample_parameters = lambda num_samples=None: theta
    before = _state_of(method)
    preds = method.predict_step(x)
    loop = loop_outputs(method, x, theta)
    expected = method.predictive(loop)
    assert set(preds) == set(expected)
    for key in expected:
        torch.testing.assert_close(preds[key], expected[key], rtol=1e-6, atol=atol, msg=key)
    after = _state_of(method)  # prediction changes no parameter and no buffer
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    return preds
