"""Convergence diagnostics and the summary table of MCMC chains.

The statistics are Pyro's (:mod:`pyro.ops.stats`): the split Gelman-Rubin ``r_hat`` (Gelman et
al. 2013, "Bayesian Data Analysis", 3rd ed., section 11.4) and the effective sample size
``n_eff`` from the chains' autocorrelations (Stan's estimator, Geyer's initial monotone
sequence). The table has the columns NumPyro's ``print_summary`` prints; its interval columns are
equal-tailed quantiles (NumPyro prints the highest posterior density interval).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from uq_box.checks import number_in

__all__ = ["INSTALL_HINT", "import_pyro", "mcmc_summary", "parameter_names"]

INSTALL_HINT = "pip install 'uq_box[pyro]' (pyro-ppl>=1.9; it needs only torch)"


def import_pyro(owner: str = "NUTSReference") -> Any:
    """The ``pyro`` package (pyro-ppl), or an ``ImportError`` naming the extra."""
    try:
        import pyro
        import pyro.infer.mcmc  # noqa: F401 -- the submodules used, imported once here
        import pyro.ops.stats  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{owner} needs pyro-ppl, an optional extra of uq_box: {INSTALL_HINT}"
        ) from err
    return pyro


def parameter_names(named_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> list[str]:
    """One name per scalar of each ``(name, shape)``: ``"0.weight[2,0]"``, ``"0.bias[1]"``.

    The order is the row-major flattening of each tensor, in the order given (the order of a
    flat parameter vector built by concatenating ``tensor.reshape(-1)``).
    """
    names = []
    for name, shape in named_shapes:
        if len(shape) == 0:
            names.append(name)
            continue
        names += [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
    return names


def mcmc_summary(
    samples: Tensor | np.ndarray,
    names: Sequence[str] | None = None,
    prob: float = 0.9,
) -> pd.DataFrame:
    """Summary table of chains: one row per scalar, the columns of NumPyro's ``print_summary``.

    Args:
        samples: ``[chains, draws, K]`` (or ``[chains, draws]`` for one scalar).
        names: ``K`` row names (``"x[k]"`` when ``None``).
        prob: mass of the central interval (``0.9``: the 5% and 95% quantiles).

    Returns:
        DataFrame indexed by name with columns ``mean, std, median, <lo>%, <hi>%, n_eff, r_hat``
        (``std`` over all chains' draws; ``r_hat`` split Gelman-Rubin; ``n_eff`` summed over
        chains).
    """
    import_pyro("mcmc_summary")
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    values = torch.as_tensor(np.asarray(samples) if not isinstance(samples, Tensor) else samples)
    if values.ndim == 2:
        values = values.unsqueeze(-1)
    if values.ndim != 3:
        raise ValueError(
            f"`samples` must have shape [chains, draws, K] or [chains, draws], got "
            f"{list(values.shape)}"
        )
    num_chains, num_draws, num_values = values.shape
    if num_draws < 4:
        raise ValueError(f"`samples` needs at least 4 draws per chain, got {num_draws}")
    number_in(prob, "prob", 0.0, 1.0)
    if names is None:
        names = [f"x[{k}]" for k in range(num_values)]
    if len(names) != num_values:
        raise ValueError(f"`names` has {len(names)} entries, expected {num_values}")
    values = values.detach().to(torch.float64).cpu()
    flat = values.reshape(-1, num_values)
    lo, hi = 50.0 * (1.0 - prob), 50.0 * (1.0 + prob)
    quantiles = torch.quantile(flat, torch.tensor([lo / 100, 0.5, hi / 100], dtype=flat.dtype), 0)
    n_eff = effective_sample_size(values, chain_dim=0, sample_dim=1)
    r_hat = split_gelman_rubin(values, chain_dim=0, sample_dim=1)
    table = {
        "mean": flat.mean(0),
        "std": flat.std(0),
        "median": quantiles[1],
        f"{lo:.1f}%": quantiles[0],
        f"{hi:.1f}%": quantiles[2],
        "n_eff": n_eff,
        "r_hat": r_hat,
    }
    return pd.DataFrame({k: v.numpy() for k, v in table.items()}, index=list(names))
