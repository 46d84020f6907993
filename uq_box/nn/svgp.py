"""A sparse variational Gaussian process layer (SVGP) in native torch, and its Gaussian likelihood.

:class:`SparseVariationalGP` is the output layer of DUE (van Amersfoort et al. 2021, "On Feature
Collapse and Deep Kernel Learning for Single Forward Pass Uncertainty"): a Gaussian process on
the hidden features ``h`` of a network, made scalable with ``M`` inducing points (Titsias 2009,
"Variational Learning of Inducing Variables in Sparse Gaussian Processes"; Hensman et al. 2015,
"Scalable Variational Gaussian Process Classification").

**The model.** Each output ``o`` (class, or regression target) is an independent GP
``f_o ~ GP(c_o, k_o)`` with a constant mean ``c_o`` and its own stationary kernel ``k_o`` (an
RBF or a Matérn kernel with a learned isotropic length scale ``l_o`` and output scale
``s_o``); the outputs share the ``M`` inducing inputs ``Z`` (``[M, D]``, learned). The inducing
values ``u_o = f_o(Z) - c_o`` are *whitened*: ``u_o = L_Z v_o`` with ``L_Z`` the Cholesky factor
of ``K_o(Z, Z)`` and the prior ``v_o ~ N(0, I)``; the variational distribution is
``q(v_o) = N(m_o, S_o)``, ``S_o = L_o L_o^T`` with ``L_o`` lower triangular (unconstrained; its
diagonal's sign is irrelevant).

**The predictive marginal** of ``f_o`` at features ``h`` is Gaussian, in closed form, with
``a = L_Z^{-1} k_o(Z, h)``:

    mean = c_o + a^T m_o,     var = k_o(h, h) - a^T a + a^T S_o a,

and the KL divergence of ``q`` from the prior is

    KL = sum_o 1/2 (tr S_o + m_o^T m_o - M - log det S_o).

The ELBO is ``sum_i E_q[log p(y_i | f(h_i))] - KL``: for a Gaussian likelihood the expectation is
in closed form (:meth:`GaussianLikelihood.expected_log_prob`), for a softmax it is estimated by
Monte Carlo over draws of the marginals (the methods of :mod:`uq_box.methods.due`). With a
Gaussian likelihood the optimal ``q`` is known in closed form
(:meth:`SparseVariationalGP.set_optimal_variational`); with ``M = N`` inducing points at the
training inputs its predictive is that of exact GP regression.

**Initialization** (:meth:`SparseVariationalGP.initialize`, the DUE recipe): the inducing points
are the ``k``-means centres of the features of a sample of training data, and the length scale
the mean pairwise distance of those features. The flag ``initialized`` is a buffer, so a model
loaded from a checkpoint is not initialized again.

``K(Z, Z)`` gets a jitter ``jitter * s_o`` on its diagonal before its Cholesky factorization;
should that fail, the jitter grows tenfold, at most three times, then a ``RuntimeError`` says so.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import softplus

from uq_box.checks import non_negative_finite, positive_finite, positive_int
from uq_box.nn.graph import in_functorch_transform

__all__ = [
    "KERNELS",
    "GaussianLikelihood",
    "SparseVariationalGP",
    "kmeans",
    "softplus_inverse",
]

#: The kernels :class:`SparseVariationalGP` offers.
KERNELS = ("rbf", "matern12", "matern32", "matern52")

#: jitter retries of the Cholesky factorization of ``K(Z, Z)`` (tenfold each)
_JITTER_RETRIES = 3


def softplus_inverse(x: Tensor) -> Tensor:
    """``softplus^{-1}(x) = x + log(1 - exp(-x))`` for ``x > 0``."""
    return x + torch.log(-torch.expm1(-x))


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|^2`` ``[Na, Nb]``, clamped at 0 against round-off."""
    d2 = a.square().sum(-1)[:, None] - 2 * a @ b.T + b.square().sum(-1)[None, :]
    return d2.clamp_min(0)


@torch.no_grad()
def kmeans(
    points: Tensor, k: int, iterations: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """``k`` cluster centres ``[k, D]`` of ``points`` ``[n, D]`` (k-means++ seeding, then Lloyd).

    A cluster that loses all its points keeps its centre. Random draws come from ``generator``
    (the global generator when ``None``).
    """
    k = positive_int(k, "k")
    if points.ndim != 2 or len(points) < k:
        raise ValueError(
            f"k-means with {k} centres needs at least {k} points [n, D], got {list(points.shape)}"
        )
    n = len(points)
    first = int(torch.randint(n, (1,), generator=generator, device=points.device).item())
    centres = [points[first]]
    nearest = (points - points[first]).square().sum(-1)
    for _ in range(1, k):
        total = nearest.sum()
        weights = nearest / total if total > 0 else torch.ones_like(nearest) / n
        index = int(torch.multinomial(weights, 1, generator=generator).item())
        centres.append(points[index])
        nearest = torch.minimum(nearest, (points - points[index]).square().sum(-1))
    centre = torch.stack(centres)
    for _ in range(iterations):
        assign = _squared_distances(points, centre).argmin(1)
        one_hot = torch.nn.functional.one_hot(assign, k).to(points.dtype)  # deterministic sums
        counts = one_hot.sum(0)
        sums = one_hot.T @ points
        updated = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centre)
        if torch.equal(updated, centre):
            break
        centre = updated
    return centre


class SparseVariationalGP(nn.Module):
    """Sparse variational GP output layer with whitened inducing values (see the module doc).

    Args:
        in_features: width ``D`` of the hidden features ``h``.
        out_features: independent GPs, one per output (class or regression target).
        num_inducing: inducing points ``M``, shared by the outputs.
        kernel: ``"rbf"``, ``"matern12"``, ``"matern32"`` or ``"matern52"``.
        lengthscale: the initial length scale of every output's kernel.
        outputscale: the initial output scale (prior variance) of every output's kernel.
        jitter: added to the diagonal of ``K(Z, Z)``, relative to the output scale.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_inducing: int = 20,
        kernel: str = "rbf",
        lengthscale: float = 1.0,
        outputscale: float = 1.0,
        jitter: float = 1e-6,
    ) -> None:
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.num_inducing = positive_int(num_inducing, "num_inducing")
        if kernel not in KERNELS:
            raise ValueError(f"`kernel` must be one of {KERNELS}, got {kernel!r}")
        self.kernel_name = kernel
        lengthscale = positive_finite(lengthscale, "lengthscale")
        outputscale = positive_finite(outputscale, "outputscale")
        self.jitter = non_negative_finite(jitter, "jitter")
        m, o = self.num_inducing, self.out_features
        self.inducing_points = nn.Parameter(torch.randn(m, self.in_features))
        self.variational_mean = nn.Parameter(torch.zeros(o, m))
        self.variational_tril = nn.Parameter(torch.eye(m).repeat(o, 1, 1))
        self.raw_lengthscale = nn.Parameter(softplus_inverse(torch.full((o,), lengthscale)))
        self.raw_outputscale = nn.Parameter(softplus_inverse(torch.full((o,), outputscale)))
        self.mean_constant = nn.Parameter(torch.zeros(o))
        self.register_buffer("initialized", torch.tensor(False))

    # -- hyperparameters -----------------------------------------------------------------------
    @property
    def lengthscale(self) -> Tensor:
        """Each output's kernel length scale ``[O]``."""
        return softplus(self.raw_lengthscale)

    @property
    def outputscale(self) -> Tensor:
        """Each output's kernel output scale (prior variance of ``f``) ``[O]``."""
        return softplus(self.raw_outputscale)

    @property
    def scale_tril(self) -> Tensor:
        """``L_o`` ``[O, M, M]``, the lower triangular factor of ``S_o = L_o L_o^T``."""
        return torch.tril(self.variational_tril)

    @torch.no_grad()
    def set_lengthscale(self, value: float | Tensor) -> None:
        """Set every output's length scale (a number or ``[O]``)."""
        value = torch.as_tensor(value, dtype=self.raw_lengthscale.dtype)
        self.raw_lengthscale.copy_(softplus_inverse(value.to(self.raw_lengthscale)))

    @torch.no_grad()
    def set_outputscale(self, value: float | Tensor) -> None:
        """Set every output's output scale (a number or ``[O]``)."""
        value = torch.as_tensor(value, dtype=self.raw_outputscale.dtype)
        self.raw_outputscale.copy_(softplus_inverse(value.to(self.raw_outputscale)))

    # -- the kernel ----------------------------------------------------------------------------
    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """``k_o(a_i, b_j)`` ``[O, Na, Nb]`` of features ``a`` ``[Na, D]`` and ``b`` ``[Nb, D]``."""
        d2 = _squared_distances(a, b)[None] / self.lengthscale.square()[:, None, None]
        scale = self.outputscale[:, None, None]
        if self.kernel_name == "rbf":
            return scale * torch.exp(-0.5 * d2)
        r = (d2 + 1e-30).sqrt() if d2.requires_grad else d2.sqrt()  # finite gradient at r = 0
        if self.kernel_name == "matern12":
            return scale * torch.exp(-r)
        if self.kernel_name == "matern32":
            s = math.sqrt(3) * r
            return scale * (1 + s) * torch.exp(-s)
        s = math.sqrt(5) * r
        return scale * (1 + s + s.square() / 3) * torch.exp(-s)

    def _check_features(self, h: Tensor) -> None:
        if h.ndim != 2 or h.shape[1] != self.in_features:
            raise ValueError(
                f"SparseVariationalGP takes features [N, {self.in_features}], got "
                f"{list(h.shape)}; flatten the hidden features before the GP layer"
            )

    def inducing_cholesky(self) -> Tensor:
        """``L_Z`` ``[O, M, M]``, the Cholesky factor of ``K_o(Z, Z) + jitter s_o I``."""
        z = self.inducing_points
        kzz = self.kernel(z, z)
        eye = torch.eye(self.num_inducing, dtype=kzz.dtype, device=kzz.device)
        if in_functorch_transform():
            return self._vectorized_cholesky(kzz, eye)
        jitter = self.jitter
        for attempt in range(_JITTER_RETRIES + 1):
            shifted = kzz + (jitter * self.outputscale)[:, None, None] * eye
            chol, info = torch.linalg.cholesky_ex(shifted)
            if not bool((info > 0).any()):
                return chol
            jitter = max(jitter * 10, 1e-8) if attempt < _JITTER_RETRIES else jitter
        raise RuntimeError(
            f"the Cholesky factorization of K(Z, Z) failed with a jitter up to {jitter:g} times "
            f"the output scale; the inducing points may coincide or the length scale be huge"
        )

    def _vectorized_cholesky(self, kzz: Tensor, eye: Tensor) -> Tensor:
        """:meth:`inducing_cholesky` inside ``torch.func.vmap`` (stacked runs), where no Python
        branch may read a tensor: every jitter of the retries is tried without gradients, and
        the factor of the first that succeeds is computed with them (NaN if none succeeds: the
        loss is then non-finite, which stops training).
        """
        jitters = [self.jitter]
        for _ in range(_JITTER_RETRIES):
            jitters.append(max(jitters[-1] * 10, 1e-8))
        scale = self.outputscale[:, None, None] * eye
        with torch.no_grad():
            chosen = torch.full((), math.nan, dtype=kzz.dtype, device=kzz.device)
            for jitter in reversed(jitters):  # the first success wins: try it last
                info = torch.linalg.cholesky_ex(kzz + jitter * scale).info
                chosen = torch.where((info == 0).all(), jitter, chosen)
        return torch.linalg.cholesky_ex(kzz + chosen * scale).L

    # -- the predictive and the KL -------------------------------------------------------------
    def marginals(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The mean and variance ``[N, O]`` of ``q(f(h))``, per point and output (closed form)."""
        self._check_features(h)
        chol = self.inducing_cholesky()
        kzx = self.kernel(self.inducing_points, h)  # [O, M, N]
        a = torch.linalg.solve_triangular(chol, kzx, upper=False)  # L_Z^{-1} k(Z, h)
        mean = torch.einsum("omn,om->no", a, self.variational_mean) + self.mean_constant
        la = self.scale_tril.transpose(-1, -2) @ a  # L^T a, [O, M, N]
        variance = self.outputscale[:, None] - a.square().sum(1) + la.square().sum(1)
        return mean, variance.T.clamp_min(0)

    def forward(self, h: Tensor) -> Tensor:
        """The predictive mean ``[N, O]``."""
        return self.marginals(h)[0]

    def kl_divergence(self) -> Tensor:
        """``KL(q(v) || N(0, I))`` summed over the outputs (closed form)."""
        tril = self.scale_tril
        diagonal = tril.diagonal(dim1=-2, dim2=-1)
        return 0.5 * (
            tril.square().sum()
            + self.variational_mean.square().sum()
            - self.num_inducing * self.out_features
            - 2 * diagonal.abs().log().sum()
        )

    # -- initialization and the Gaussian optimum -----------------------------------------------
    @torch.no_grad()
    def initialize(
        self,
        features: Tensor,
        lengthscale: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        """DUE's initialization from hidden features ``[n, D]`` of training data (``n >= M``).

        The inducing points become the ``M`` k-means centres of ``features``; with
        ``lengthscale``, every output's length scale becomes the mean pairwise distance of the
        features (0 distances aside: 1 if all features coincide). Marks the layer initialized.
        """
        features = features.detach().to(self.inducing_points)
        self._check_features(features)
        if len(features) < self.num_inducing:
            raise ValueError(
                f"initializing {self.num_inducing} inducing points needs at least as many "
                f"feature vectors, got {len(features)}; lower `num_inducing` or read more data"
            )
        self.inducing_points.copy_(kmeans(features, self.num_inducing, generator=generator))
        if lengthscale:
            distances = torch.pdist(features)
            value = distances.mean() if bool((distances > 0).any()) else torch.ones(())
            self.set_lengthscale(value.clamp_min(1e-6))
        self.initialized.fill_(True)

    @torch.no_grad()
    def set_optimal_variational(
        self, features: Tensor, targets: Tensor, noise_variance: float | Tensor
    ) -> None:
        """Set ``q(v)`` to the ELBO's optimum under a Gaussian likelihood (Titsias 2009).

        With ``Phi = (L_Z^{-1} K(Z, X))^T`` ``[N, M]`` per output, the optimum is the posterior
        of Bayesian linear regression in ``v``: ``S = (I + Phi^T Phi / sigma^2)^{-1}``,
        ``m = S Phi^T (y - c) / sigma^2``. ``targets`` ``[N, O]``; ``noise_variance`` a number
        or ``[O]``.
        """
        self._check_features(features)
        targets = targets.to(features).reshape(len(features), self.out_features)
        noise = torch.as_tensor(noise_variance, dtype=features.dtype, device=features.device)
        noise = noise.expand(self.out_features)
        chol = self.inducing_cholesky()
        phi = torch.linalg.solve_triangular(
            chol, self.kernel(self.inducing_points, features), upper=False
        )  # [O, M, N], = Phi^T
        eye = torch.eye(self.num_inducing, dtype=features.dtype, device=features.device)
        precision = eye + phi @ phi.transpose(-1, -2) / noise[:, None, None]
        covariance = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        residual = (targets - self.mean_constant).T  # [O, N]
        mean = (covariance @ (phi @ residual[..., None]))[..., 0] / noise[:, None]
        self.variational_mean.copy_(mean)
        self.variational_tril.copy_(torch.linalg.cholesky(covariance))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_inducing={self.num_inducing}, kernel={self.kernel_name!r}"
        )


class GaussianLikelihood(nn.Module):
    """Gaussian likelihood ``y ~ N(f, sigma^2)`` with a learned noise variance, per target.

    The regression likelihood of DUE: the network (the GP) gives one output per target, the
    mean; the noise variance ``sigma^2 = softplus(raw) + min_noise`` is a parameter, one per
    target (``num_targets``) or shared (1).

    Args:
        num_targets: noise variances (1: one shared by every target).
        noise: the initial noise variance.
        min_noise: floor of the noise variance.
    """

    def __init__(self, num_targets: int = 1, noise: float = 0.1, min_noise: float = 1e-6) -> None:
        super().__init__()
        self.num_targets = positive_int(num_targets, "num_targets")
        self.min_noise = non_negative_finite(min_noise, "min_noise")
        noise = positive_finite(noise, "noise")
        if noise <= self.min_noise:
            raise ValueError(f"`noise` must exceed `min_noise` ({min_noise}), got {noise}")
        initial = torch.full((self.num_targets,), noise - self.min_noise)
        self.raw_noise = nn.Parameter(softplus_inverse(initial))

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: 1 (the mean)."""
        return 1

    @property
    def noise(self) -> Tensor:
        """The noise variance ``[num_targets]``."""
        return softplus(self.raw_noise) + self.min_noise

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(outputs, sigma)``: the outputs are the means, ``sigma`` broadcast to them."""
        return outputs, self.noise.sqrt().to(outputs.dtype).expand_as(outputs)

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise ``log N(target | outputs, sigma^2)``."""
        return self.expected_log_prob(outputs, torch.zeros_like(outputs), target)

    def expected_log_prob(self, mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
        """``E_{f ~ N(mean, variance)}[log N(target | f, sigma^2)]``, elementwise (closed form):
        ``log N(target | mean, sigma^2) - variance / (2 sigma^2)``.
        """
        noise = self.noise.to(mean.dtype)
        return -0.5 * (
            math.log(2 * math.pi) + noise.log() + ((target - mean).square() + variance) / noise
        )

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean negative log-density of ``target`` under ``N(outputs, sigma^2)``."""
        return -self.log_prob(outputs, target).mean()

    def extra_repr(self) -> str:
        return f"num_targets={self.num_targets}, min_noise={self.min_noise}"
