"""Gaussian discriminant analysis on features: the feature density of DDU.

:class:`GaussianDiscriminant` fits one Gaussian per class to features ``f`` (class means and
per-class covariances, Mukhoti et al. 2023, "Deep Deterministic Uncertainty: A New Simple
Baseline") and gives the log density of the mixture weighted by the class frequencies,

    log q(f) = logsumexp_c [ log pi_c + log N(f; mu_c, Sigma_c) ],

the epistemic measure of DDU: low density = far from the training features. Fitted from
sufficient statistics (counts, sums, sums of outer products per class, in float64), so batches
and processes can be added before the fit. A covariance that is not positive definite (fewer
points than dimensions, a constant feature) gets the smallest jitter ``10^k * mean(diag)``,
``k = -6, -5, ..., 0``, on its diagonal that makes its Cholesky factorization succeed (the
search of the DDU code, from 1e-6 rather than the smallest float: features that never vary in
a class, such as dead ReLUs, then give large but well-conditioned distances); a covariance of
zeros (a class with one point) becomes the identity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["GaussianDiscriminant", "class_statistics"]

_JITTER_EXPONENTS = range(-6, 1)


def class_statistics(
    features: Tensor, labels: Tensor, num_classes: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class ``(counts [C], sums [C, D], outer-product sums [C, D, D])`` in float64."""
    features = features.detach().double().reshape(len(features), -1)
    labels = labels.to(features.device).long()
    one_hot = torch.nn.functional.one_hot(labels, num_classes).double()  # [N, C]
    counts = one_hot.sum(0)
    sums = one_hot.T @ features
    outer = torch.einsum("nc,nd,ne->cde", one_hot, features, features)
    return counts, sums, outer


class GaussianDiscriminant(nn.Module):
    """Class-conditional Gaussians on features, with per-class covariances (buffers).

    Unfitted it holds empty buffers; :meth:`fit` sizes them, and loading a ``state_dict``
    resizes them to the saved shapes (checkpoints carry the fit).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("log_weights", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("means", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("cholesky", torch.zeros(0, 0, 0, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        """Whether :meth:`fit` has run (or a fit was loaded)."""
        return self.classes.numel() > 0

    @torch.no_grad()
    def fit(self, counts: Tensor, sums: Tensor, outer: Tensor) -> GaussianDiscriminant:
        """Fit from :func:`class_statistics` (summed over batches); classes without points are
        left out. Returns ``self``.
        """
        counts, sums, outer = counts.double(), sums.double(), outer.double()
        present = counts > 0
        if not bool(present.any()):
            raise ValueError("GaussianDiscriminant.fit got no points")
        classes = present.nonzero().flatten()
        n, s, o = counts[classes], sums[classes], outer[classes]
        means = s / n[:, None]
        scatter = o - n[:, None, None] * means[:, :, None] * means[:, None, :]
        covariance = scatter / (n - 1).clamp_min(1)[:, None, None]
        covariance = 0.5 * (covariance + covariance.transpose(1, 2))
        factors = torch.stack([_jittered_cholesky(c) for c in covariance])
        self.classes = classes.to(self.classes.device)
        self.log_weights = (n / n.sum()).log()
        self.means = means
        self.cholesky = factors
        return self

    @torch.no_grad()
    def class_log_densities(self, features: Tensor) -> Tensor:
        """``log pi_c + log N(f; mu_c, Sigma_c)`` ``[N, K]`` of features ``[N, D]`` (float64)."""
        if not self.fitted:
            raise RuntimeError("GaussianDiscriminant is not fitted")
        f = features.detach().double().reshape(len(features), -1)
        dim = f.shape[1]
        if dim != self.means.shape[1]:
            raise ValueError(f"expected features of width {self.means.shape[1]}, got {dim}")
        # float64 whatever `.to(dtype)` made of the buffers
        means, cholesky = self.means.double(), self.cholesky.double()
        centred = (f[None] - means[:, None]).transpose(1, 2)  # [K, D, N]
        solved = torch.linalg.solve_triangular(cholesky, centred, upper=False)
        mahalanobis = solved.square().sum(1)  # [K, N]
        log_det = 2 * cholesky.diagonal(dim1=1, dim2=2).log().sum(-1)  # [K]
        log_normal = -0.5 * (mahalanobis + log_det[:, None] + dim * math.log(2 * math.pi))
        return (log_normal + self.log_weights.double()[:, None]).T

    def log_density(self, features: Tensor) -> Tensor:
        """``log q(f)`` ``[N]`` (float64): the mixture of the class Gaussians."""
        return torch.logsumexp(self.class_log_densities(features), dim=-1)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        for name in ("classes", "log_weights", "means", "cholesky"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _jittered_cholesky(covariance: Tensor) -> Tensor:
    factor, info = torch.linalg.cholesky_ex(covariance)
    if int(info) == 0:
        return factor
    eye = torch.eye(len(covariance), dtype=covariance.dtype, device=covariance.device)
    scale = covariance.diagonal().mean().abs()
    if float(scale) == 0.0:  # one point, or constant features: unit variances
        return eye.clone()
    for exponent in _JITTER_EXPONENTS:
        factor, info = torch.linalg.cholesky_ex(covariance + (10.0**exponent) * scale * eye)
        if int(info) == 0:
            return factor
    return torch.linalg.cholesky(covariance + scale * eye)
