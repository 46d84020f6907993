"""A Gaussian-process output layer from random Fourier features, with its Laplace covariance.

:class:`RandomFeatureGP` is the output layer of SNGP (Liu et al. 2020, "Simple and Principled
Uncertainty Estimation with Deterministic Deep Learning via Distance Awareness"): a Gaussian
process with an RBF kernel on the hidden features ``h``, approximated by ``D`` random Fourier
features (Rahimi & Recht 2007)

    phi(h) = sqrt(2 / D) cos(W h + b),   W_ij ~ N(0, 1 / lengthscale^2),   b_i ~ U(0, 2 pi),

fixed at construction (buffers), and a linear read-out ``f(h) = beta^T phi(h) (+ bias)`` whose
weights ``beta`` are trained. With the prior ``beta ~ N(0, I / ridge_penalty)`` (the L2 penalty
the methods add to the loss) the Laplace approximation of the posterior of each output's
``beta`` has the precision

    P = ridge_penalty I + sum_i w_i phi(h_i) phi(h_i)^T,

shared by the outputs, where ``w_i`` is the curvature of the loss at point ``i`` (``1 /
sigma_i^2`` for a Gaussian likelihood, ``p_i (1 - p_i)`` of the largest softmax probability for
classification, as in Liu et al.'s implementation). The predictive variance of every output at
``h`` is ``phi(h)^T P^{-1} phi(h)``: about ``1 / ridge_penalty`` far from the data (``|phi| ~
1``), small where the data are dense. For a Gaussian likelihood with ``w_i = 1 / sigma^2`` this is
exactly the posterior of Bayesian linear regression on the random features.

The precision is a buffer (checkpoints carry it); :meth:`RandomFeatureGP.update_precision` adds
a batch, :meth:`RandomFeatureGP.reset_precision` starts over. SNGP resets it at the start of
every training epoch, so after training it holds the last epoch's points (the exact, momentum-free
variant of Liu et al.). The bias is a point estimate, outside the posterior.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from uq_box.checks import positive_finite, positive_int
from uq_box.nn.graph import in_functorch_transform

__all__ = ["RandomFeatureGP"]


class RandomFeatureGP(nn.Module):
    """Random-Fourier-feature GP output layer with a Laplace precision matrix.

    Args:
        in_features: width of the hidden features ``h``.
        out_features: outputs (classes, or the network's regression outputs).
        num_features: random features ``D`` (1024 in Liu et al.).
        lengthscale: the RBF kernel's length scale on ``h``.
        ridge_penalty: prior precision of the read-out weights (``beta ~ N(0, I / ridge)``).
        bias: a trainable output bias (a point estimate).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_features: int = 1024,
        lengthscale: float = 1.0,
        ridge_penalty: float = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.num_features = positive_int(num_features, "num_features")
        self.lengthscale = positive_finite(lengthscale, "lengthscale")
        self.ridge_penalty = positive_finite(ridge_penalty, "ridge_penalty")
        self.register_buffer("projection", torch.randn(num_features, in_features) / lengthscale)
        self.register_buffer("phase", 2 * math.pi * torch.rand(num_features))
        self.register_buffer("precision", ridge_penalty * torch.eye(num_features))
        self.output = nn.Linear(num_features, out_features, bias=bias)
        self._cholesky: tuple[tuple, Tensor] | None = None

    def random_features(self, h: Tensor) -> Tensor:
        """``phi(h) = sqrt(2 / D) cos(W h + b)``: ``[N, in_features] -> [N, D]``."""
        if h.ndim != 2 or h.shape[1] != self.in_features:
            raise ValueError(
                f"RandomFeatureGP takes features [N, {self.in_features}], got "
                f"{list(h.shape)}; flatten the hidden features before the GP layer"
            )
        scale = math.sqrt(2.0 / self.num_features)
        return scale * torch.cos(h @ self.projection.T + self.phase)

    def forward(self, h: Tensor) -> Tensor:
        """The posterior mean outputs ``[N, out_features]``."""
        return self.output(self.random_features(h))

    @torch.no_grad()
    def reset_precision(self) -> None:
        """Back to the prior precision ``ridge_penalty I``."""
        self.precision.copy_(self.ridge_penalty * torch.eye(self.num_features).to(self.precision))

    @torch.no_grad()
    def precision_increment(self, features: Tensor, weights: Tensor | None = None) -> Tensor:
        """``sum_i w_i phi_i phi_i^T`` of a batch of random features ``[N, D]``, weights ``[N]``."""
        features = features.detach().to(self.precision.dtype)
        if weights is not None:
            features = features * weights.detach().to(features.dtype).sqrt()[:, None]
        return features.T @ features

    @torch.no_grad()
    def update_precision(self, features: Tensor, weights: Tensor | None = None) -> None:
        """Add a batch of random features ``[N, D]`` (curvatures ``w`` ``[N]``, 1 if ``None``)."""
        self.precision.add_(self.precision_increment(features, weights))

    def _precision_cholesky(self) -> Tensor:
        """Cholesky factor of the precision in float64, cached while the precision is unchanged."""
        p = self.precision
        if in_functorch_transform():  # stacked runs: a batched tensor, nothing to cache
            return torch.linalg.cholesky(p.detach().double())
        key = (p._version, p.data_ptr(), p.device, p.dtype)
        if self._cholesky is None or self._cholesky[0] != key:
            self._cholesky = (key, torch.linalg.cholesky(p.detach().double()))
        return self._cholesky[1]

    def covariance(self) -> Tensor:
        """The posterior covariance ``P^{-1}`` of each output's read-out weights ``[D, D]``."""
        chol = self._precision_cholesky()
        return torch.cholesky_inverse(chol).to(self.precision.dtype)

    @torch.no_grad()
    def predictive_variance(self, features: Tensor) -> Tensor:
        """``phi^T P^{-1} phi`` per point ``[N]`` of random features ``[N, D]``, the variance of
        every output (computed in float64, returned in the features' dtype).
        """
        chol = self._precision_cholesky()
        solved = torch.linalg.solve_triangular(chol, features.detach().double().T, upper=False)
        return solved.square().sum(0).to(features.dtype)

    def predict(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean ``[N, out_features]`` and predictive variance ``[N]`` at ``h``."""
        features = self.random_features(h)
        return self.output(features), self.predictive_variance(features)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 -- nn.Module's signature
        self._cholesky = None
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_features={self.num_features}, lengthscale={self.lengthscale}, "
            f"ridge_penalty={self.ridge_penalty}"
        )
