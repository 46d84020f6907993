"""A reference posterior for small networks: NUTS on the flat parameter vector of a uq_box backbone.

The sampler is Pyro's No-U-Turn sampler (Hoffman & Gelman 2014, "The No-U-Turn Sampler"; Pyro's
multinomial variant with step-size and diagonal mass-matrix adaptation during warmup), an optional
extra (``pip install 'uq_box[pyro]'``): a well-kept implementation beats our own for a reference.
It runs on a ``potential_fn`` over one flat vector ``theta`` of *all* the backbone's parameters,
evaluated with :func:`torch.func.functional_call`, so any ``nn.Module`` (the same ``MLP`` the
approximate methods train) works unchanged and no Pyro model is written.

**The model.** A zero-mean Normal prior of scale ``prior_scale`` on every parameter and a
homoscedastic Gaussian likelihood of the network's outputs (one output per target):

``U(theta, sigma) = -sum_i log N(y_i | f_theta(x_i), sigma^2) - sum_j log N(theta_j | 0, prior_scale^2)``
``                  - log p(sigma)``.

``noise`` is either a known standard deviation ``sigma`` or ``"learned"``: then ``sigma`` is
sampled too, with a ``HalfCauchy(noise_prior_scale)`` prior (as the NumPyro BNN tutorial), on the
unconstrained ``log sigma`` (Jacobian included).

**Chains** run one after another in this process, each from its own initial point and seed
(``num_chains`` worker processes do not pay off on a few cores). Samples stay in memory:
``samples`` ``[chains, draws, P]`` and, with a learned noise, ``noise_samples`` ``[chains, draws]``.
Sampling runs in float64 (``dtype``) on a copy of the backbone; the backbone itself is untouched.

**Diagnostics** (:meth:`NUTSReference.summary`, :func:`uq_box.reference.mcmc_summary`): split
``r_hat`` and ``n_eff`` per parameter, and the number of divergent transitions after warmup. For a
network, ``r_hat`` of the weights is often large even when the predictions have converged (hidden
units can be permuted or flip sign, and each chain keeps to one of these equivalent modes);
:meth:`NUTSReference.prediction_summary` gives the same table for the network's outputs at given
inputs, which the symmetries leave alone.

**Prediction** (:meth:`NUTSReference.predict`) runs the stored samples as one vectorized call
(``torch.func.vmap`` over ``functional_call``) and returns the regression prediction contract
(:func:`uq_box.methods.predictive.regression_predictive`): the epistemic part is the spread of
``f_theta(x)`` over the samples, the aleatoric part the noise.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.distributions import HalfCauchy
from torch.func import functional_call, vmap

from uq_box.checks import non_negative_int, number_in, positive_finite, positive_int
from uq_box.losses import MSE, NLL
from uq_box.methods.base import unpack_batch
from uq_box.methods.predictive import regression_predictive
from uq_box.methods.sampled import unflatten_parameters
from uq_box.reference.diagnostics import import_pyro, mcmc_summary, parameter_names

__all__ = ["NUTSReference"]

INITS = ("model", "prior")


def _as_data(value: Any, name: str, dtype: torch.dtype) -> Tensor:
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`{name}` must be a tensor or array, got {type(value).__name__}"
            ) from err
    if value.ndim == 0:
        raise ValueError(f"`{name}` must have a batch dimension, got a scalar")
    if not value.is_floating_point():
        raise TypeError(f"`{name}` must hold real numbers, got dtype {value.dtype}")
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains non-finite values (NaN or inf); expected finite data")
    return value.detach().to(dtype)


class NUTSReference:
    """NUTS samples of a backbone's posterior under a Normal prior and a Gaussian likelihood.

    Args:
        model: the backbone (any ``nn.Module`` with one output per target); copied, never changed.
        prior_scale: scale of the zero-mean Normal prior on every parameter.
        noise: known noise standard deviation, or ``"learned"`` to sample it too.
        noise_prior_scale: scale of the ``HalfCauchy`` prior of a learned noise std.
        num_chains: chains, run one after another.
        num_warmup: adaptation steps per chain (discarded).
        num_samples: draws kept per chain.
        target_accept_prob: the step-size adaptation's target acceptance probability (raise it,
            e.g. to 0.9, when there are divergences).
        max_tree_depth: NUTS trees have at most ``2**max_tree_depth - 1`` leapfrog steps.
        full_mass: adapt a dense mass matrix instead of a diagonal one (small ``P`` only).
        init: each chain's initial point: ``"model"`` re-initializes the backbone's layers
            (``reset_parameters``, seeded per chain), ``"prior"`` draws from the prior, or a tensor
            ``[num_chains, P]`` (or ``[P]`` for all chains).
        dtype: floating point type of the sampler (float64 keeps the energy error accurate).
        seed: chain ``c`` runs with the torch seed ``seed + c``; the global RNG is left as it was.
        progress_bar: show Pyro's progress bar.
    """

    def __init__(
        self,
        model: nn.Module,
        prior_scale: float = 1.0,
        noise: float | str = "learned",
        noise_prior_scale: float = 0.5,
        num_chains: int = 4,
        num_warmup: int = 500,
        num_samples: int = 500,
        target_accept_prob: float = 0.8,
        max_tree_depth: int = 10,
        full_mass: bool = False,
        init: str | Tensor = "model",
        dtype: torch.dtype = torch.float64,
        seed: int = 0,
        progress_bar: bool = False,
    ) -> None:
        import_pyro(type(self).__name__)
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        if not any(True for _ in model.parameters()):
            raise ValueError("`model` has no parameters; there is nothing to sample")
        self.prior_scale = positive_finite(prior_scale, "prior_scale")
        if isinstance(noise, str):
            if noise != "learned":
                raise ValueError(f"`noise` must be 'learned' or a positive number, got {noise!r}")
            self.noise: float | str = noise
        else:
            self.noise = positive_finite(noise, "noise")
        self.noise_prior_scale = positive_finite(noise_prior_scale, "noise_prior_scale")
        self.num_chains = positive_int(num_chains, "num_chains")
        self.num_warmup = non_negative_int(num_warmup, "num_warmup")
        self.num_samples = positive_int(num_samples, "num_samples")
        self.target_accept_prob = number_in(target_accept_prob, "target_accept_prob", 0.0, 1.0)
        self.max_tree_depth = positive_int(max_tree_depth, "max_tree_depth")
        self.full_mass = bool(full_mass)
        if isinstance(init, str) and init not in INITS:
            raise ValueError(f"`init` must be one of {list(INITS)} or a tensor, got {init!r}")
        if not isinstance(init, str | Tensor):
            raise TypeError(f"`init` must be one of {list(INITS)} or a tensor, got {init!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"`dtype` must be a floating point torch.dtype, got {dtype!r}")
        self.init = init
        self.dtype = dtype
        self.seed = int(seed)
        self.progress_bar = bool(progress_bar)

        # a private copy in eval mode (dropout off): the target density is deterministic
        self.model = copy.deepcopy(model).to(dtype).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        named = [(name, tuple(p.shape)) for name, p in self.model.named_parameters()]
        self.parameter_names = [name for name, _ in named]
        self._shapes = [shape for _, shape in named]
        self._numels = [math.prod(shape) for shape in self._shapes]
        self.flat_names = parameter_names(named)

        self.samples: Tensor | None = None
        self.noise_samples: Tensor | None = None
        self.chain_diagnostics: list[dict[str, Any]] = []

    # -- parameters -----------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """``P``, the length of the flat parameter vector."""
        return sum(self._numels)

    @property
    def learns_noise(self) -> bool:
        """Whether the noise std is sampled."""
        return self.noise == "learned"

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``[..., P]`` into the backbone's parameters, each ``[..., *shape]``."""
        return unflatten_parameters(flat, self.parameter_names, self._shapes)

    def flatten(self, model: nn.Module) -> Tensor:
        """The parameters of ``model`` (same architecture) as one flat vector ``[P]``."""
        params = dict(model.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.parameter_names]).to(
            self.dtype
        )

    def _initial_point(self, chain: int) -> Tensor:
        if isinstance(self.init, Tensor):
            init = self.init.detach().to(self.dtype)
            if init.shape == (self.num_parameters,):
                return init
            if init.shape != (self.num_chains, self.num_parameters):
                raise ValueError(
                    f"`init` must have shape [{self.num_chains}, {self.num_parameters}] or "
                    f"[{self.num_parameters}], got {list(init.shape)}"
                )
            return init[chain]
        if self.init == "prior":
            return self.prior_scale * torch.randn(self.num_parameters, dtype=self.dtype)
        fresh = copy.deepcopy(self.model)
        with torch.no_grad():
            for module in fresh.modules():
                if callable(getattr(module, "reset_parameters", None)):
                    module.reset_parameters()
        return self.flatten(fresh)

    # -- the target density ------------------------------------------------------------------------
    def potential(self, theta: Tensor, log_noise: Tensor | None, x: Tensor, y: Tensor) -> Tensor:
        """``U = -log p(y | x, theta, sigma) - log p(theta) - log p(log sigma)``, constants included."""
        outputs = functional_call(self.model, self.unflatten(theta), (x,))
        if log_noise is None:
            sigma = torch.as_tensor(self.noise, dtype=theta.dtype)
            log_sigma = sigma.log()
            noise_prior = theta.new_zeros(())
        else:
            log_sigma = log_noise
            sigma = log_noise.exp()
            prior = HalfCauchy(torch.as_tensor(self.noise_prior_scale, dtype=theta.dtype))
            noise_prior = -(prior.log_prob(sigma) + log_noise)
        nll = (0.5 * ((y - outputs) / sigma) ** 2 + log_sigma + 0.5 * math.log(2 * math.pi)).sum()
        scale = self.prior_scale
        prior_nll = (0.5 * (theta / scale) ** 2).sum() + theta.numel() * (
            math.log(scale) + 0.5 * math.log(2 * math.pi)
        )
        return nll + prior_nll + noise_prior

    def _check_data(self, x: Any, y: Any) -> tuple[Tensor, Tensor]:
        x = _as_data(x, "X", self.dtype)
        y = _as_data(y, "y", self.dtype)
        if y.ndim == 1:
            y = y.unsqueeze(-1)
        if len(x) != len(y):
            raise ValueError(f"`X` has {len(x)} points but `y` has {len(y)}")
        with torch.no_grad():
            outputs = self.model(x[:1])
        if outputs.shape[1:] != y.shape[1:]:
            raise ValueError(
                f"the network gives outputs of shape {list(outputs.shape[1:])} per point but "
                f"NUTSReference models a Gaussian mean per target, shape {list(y.shape[1:])}; set "
                f"the network's `n_outputs` to {y.shape[-1]}"
            )
        return x, y

    # -- sampling ---------------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> NUTSReference:  # noqa: N803 -- the field's name
        """Run ``num_chains`` NUTS chains on the data ``X`` ``[N, ...]``, ``y`` ``[N, T]``.

        Returns:
            ``self``, with ``samples`` ``[chains, draws, P]``, ``noise_samples`` (learned noise)
            and ``chain_diagnostics`` (per chain: divergences after warmup, mean acceptance
            statistic of the draws, adapted step size, gradient evaluations per iteration
            (warmup included; a tree of depth ``d`` takes up to ``2**d - 1``), seconds).
        """
        import_pyro(type(self).__name__)
        x, y = self._check_data(X, y)
        chains, noises, self.chain_diagnostics = [], [], []
        for chain in range(self.num_chains):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed + chain)
                draws, noise, diag = self._run_chain(chain, x, y)
            chains.append(draws)
            noises.append(noise)
            self.chain_diagnostics.append(diag)
        self.samples = torch.stack(chains)
        self.noise_samples = torch.stack(noises) if self.learns_noise else None
        return self

    def _run_chain(
        self, chain: int, x: Tensor, y: Tensor
    ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        from pyro.infer.mcmc import MCMC, NUTS

        initial = {"theta": self._initial_point(chain)}
        if self.learns_noise:
            initial["log_noise"] = y.std().clamp_min(1e-3).log().reshape(())
        num_evals = [0]

        def potential_fn(z: dict[str, Tensor]) -> Tensor:
            num_evals[0] += 1
            return self.potential(z["theta"], z.get("log_noise"), x, y)

        kernel = NUTS(
            potential_fn=potential_fn,
            target_accept_prob=self.target_accept_prob,
            max_tree_depth=self.max_tree_depth,
            full_mass=self.full_mass,
        )
        last: dict[str, str] = {}

        def hook_fn(kernel: Any, params: Any, stage: str, i: int) -> None:
            last.update(kernel.logging())  # the kernel resets these when the run ends

        mcmc = MCMC(
            kernel,
            num_samples=self.num_samples,
            warmup_steps=self.num_warmup,
            initial_params=initial,
            hook_fn=hook_fn,
            disable_progbar=not self.progress_bar,
        )
        start = time.perf_counter()
        mcmc.run()
        seconds = time.perf_counter() - start
        samples = mcmc.get_samples()
        mcmc_diag = mcmc.diagnostics()
        diag = {
            "chain": chain,
            "divergences": len(mcmc_diag["divergences"]["chain 0"]),
            # the mean acceptance statistic of the draws (what the step size adaptation targets)
            "accept_prob": float(last["acc. prob"]),
            "step_size": float(last["step size"]),
            "grad_evals_per_iteration": num_evals[0] / (self.num_warmup + self.num_samples),
            "seconds": seconds,
        }
        theta = samples["theta"].detach().to(self.dtype)
        noise = samples["log_noise"].detach().exp().to(self.dtype) if self.learns_noise else None
        return theta, noise, diag

    def _check_fitted(self) -> Tensor:
        if self.samples is None:
            raise RuntimeError("NUTSReference has no samples yet; call `fit(X, y)` first")
        return self.samples

    # -- diagnostics ------------------------------------------------------------------------------
    @property
    def num_divergences(self) -> int:
        """Divergent transitions after warmup, all chains together."""
        self._check_fitted()
        return sum(d["divergences"] for d in self.chain_diagnostics)

    def summary(self, prob: float = 0.9) -> pd.DataFrame:
        """Per-parameter table: mean, std, median, interval, ``n_eff``, ``r_hat``.

        Rows are named like ``"model.0.weight[3,0]"`` (plus ``"noise_std"`` when learned);
        ``table.attrs["num_divergences"]`` holds the number of divergences after warmup.
        """
        samples = self._check_fitted()
        names = list(self.flat_names)
        if self.noise_samples is not None:
            samples = torch.cat([samples, self.noise_samples.unsqueeze(-1)], dim=-1)
            names.append("noise_std")
        table = mcmc_summary(samples, names, prob)
        table.attrs["num_divergences"] = self.num_divergences
        return table

    def print_summary(self, prob: float = 0.9) -> pd.DataFrame:
        """Print :meth:`summary` and the number of divergences as NumPyro does; return the table."""
        table = self.summary(prob)
        print(table.to_string(float_format=lambda v: f"{v:.2f}"))
        print(f"Number of divergences: {table.attrs['num_divergences']}")
        return table

    def prediction_summary(self, x: Any, prob: float = 0.9) -> pd.DataFrame:
        """The :meth:`summary` table of the network's outputs ``f_theta(x)`` (one row per output).

        Their ``r_hat`` tells whether the chains agree on the predictions, which the weight
        symmetries of a network do not disturb.
        """
        samples = self._check_fitted()
        x = _as_data(x, "x", self.dtype)
        chains, draws, _ = samples.shape
        outputs = self.sample_outputs(x, samples.reshape(chains * draws, -1))
        outputs = outputs.reshape(chains, draws, -1)
        width = outputs.shape[-1] // len(x)
        names = [
            f"f[{i}]" if width == 1 else f"f[{i},{t}]" for i in range(len(x)) for t in range(width)
        ]
        return mcmc_summary(outputs, names, prob)

    # -- prediction -------------------------------------------------------------------------------
    def sample_outputs(self, x: Tensor, flat: Tensor, chunk_size: int | None = 512) -> Tensor:
        """Network outputs for parameter vectors ``flat`` ``[S, P]`` in one vectorized call."""
        model = self.model

        def call(params: dict[str, Tensor]) -> Tensor:
            return functional_call(model, params, (x,))

        with torch.no_grad():
            return vmap(call, chunk_size=chunk_size)(self.unflatten(flat.to(self.dtype)))

    def _sample_indices(self, num_samples: int | None) -> Tensor:
        total = self._check_fitted().shape[0] * self.samples.shape[1]
        if num_samples is None or num_samples >= total:
            return torch.arange(total)
        positive_int(num_samples, "num_samples")
        return torch.linspace(0, total - 1, num_samples).round().long()

    def predict(self, x: Any, num_samples: int | None = None) -> dict[str, Tensor]:
        """The regression prediction contract at ``x`` ``[M, ...]`` from the stored samples.

        Args:
            x: inputs.
            num_samples: samples used, evenly spaced over all chains' draws (all when ``None``).

        Returns:
            ``pred``, ``pred_uct``, ``epistemic_uct``, ``aleatoric_uct`` ``[M, T]`` and
            ``samples`` ``[S, M, T]`` (the sampled means), in the dtype of ``x`` (float32 for
            non-tensor input).
        """
        samples = self._check_fitted()
        out_dtype = x.dtype if isinstance(x, Tensor) and x.is_floating_point() else torch.float32
        x = _as_data(x, "x", self.dtype)
        index = self._sample_indices(num_samples)
        flat = samples.reshape(-1, samples.shape[-1])[index]
        outputs = self.sample_outputs(x, flat)
        if self.noise_samples is None:
            preds = regression_predictive(outputs, NLL(std=float(self.noise)))
        else:
            noise = self.noise_samples.reshape(-1)[index]
            preds = regression_predictive(outputs, MSE(), (noise**2).mean().sqrt())
        return {name: value.to(out_dtype) for name, value in preds.items()}

    def predict_step(
        self, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        """:meth:`predict` on a batch (dict, tuple or tensor), as the methods' ``predict_step``."""
        x, _ = unpack_batch(batch)
        return self.predict(x)
