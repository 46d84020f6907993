"""Reference posteriors for small networks (optional extra ``uq_box[pyro]``).

:class:`NUTSReference` samples a backbone's posterior with Pyro's NUTS; :func:`mcmc_summary`
tabulates any chains with ``r_hat`` and ``n_eff``. Importing this package does not need pyro;
constructing or fitting does.
"""

from uq_box.reference.diagnostics import mcmc_summary, parameter_names
from uq_box.reference.nuts import NUTSReference

__all__ = ["NUTSReference", "mcmc_summary", "parameter_names"]
