"""Losses: negative log-likelihoods of several families, the evidence lower bound, the pinball loss.

A regression criterion also says how to read the network's raw outputs as a predictive mean and
standard deviation (:meth:`NLL.mean_and_std`), so that every method splits uncertainty the same way.
The likelihood families (:class:`Likelihood`: :class:`NLL` (Gaussian, optionally beta-NLL),
:class:`StudentTNLL`, :class:`LaplaceNLL`, :class:`LogNormalNLL`, :class:`GaussianMixtureNLL`
(mixture density network), :class:`NormalInverseGammaNLL` (deep evidential regression) and
:class:`MultivariateNLL` (a Gaussian over all targets with a full covariance, a Cholesky head))
also give the real per-sample log-density (``log_prob``), which the predictive NLL metric reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from uq_box.checks import non_negative_finite, number_in, positive_finite, positive_int

LOG_2PI = math.log(2.0 * math.pi)
LOG_PI = math.log(math.pi)


def softplus_std(raw: Tensor, min_std: float = 1e-6) -> Tensor:
    """Standard deviation from an unconstrained output: ``softplus(raw) + min_std``.

    Softplus (Lakshminarayanan et al. 2017, "Simple and Scalable Predictive Uncertainty Estimation
    using Deep Ensembles") grows linearly rather than exponentially, so a large raw output does not
    blow up the gradient as a log-variance parameterization can.
    """
    return F.softplus(raw) + min_std


def gaussian_nll_loss(mean: Tensor, std: Tensor, target: Tensor) -> Tensor:
    """Elementwise ``-log N(target | mean, std^2)``, shapes broadcast (no reduction).

    The loss of :class:`NLL`; the metric of the same quantity, the mean over checked ``[N]`` or
    ``[N, T]`` predictions, is :func:`uq_box.metrics.functional.gaussian_nll`.
    """
    return 0.5 * LOG_2PI + torch.log(std) + 0.5 * ((target - mean) / std) ** 2


class Likelihood(nn.Module):
    """A likelihood family: how ``num_outputs`` raw outputs per target describe a distribution.

    Subclasses give :attr:`num_outputs`, :meth:`mean_and_std` (the distribution's mean and
    standard deviation, the moments of the prediction contract) and :meth:`log_prob` (its real
    log-density, elementwise); the loss is the mean negative log-density.
    """

    @property
    def num_outputs(self) -> int:
        """Network outputs per target."""
        raise NotImplementedError

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., T * num_outputs] -> (mean [..., T], std [..., T])``."""
        raise NotImplementedError

    def _init_resolution(self, resolution: float) -> None:
        """Keep the targets' grid step ``Δ`` (0: continuous targets), see :meth:`with_rounding`."""
        resolution = non_negative_finite(resolution, "resolution")
        self.quantized = resolution > 0
        # a buffer, so that stacked runs (one split each) keep their own grid step
        self.register_buffer("resolution", torch.tensor(float(resolution)), persistent=False)

    def with_rounding(self, scale: Tensor) -> Tensor:
        """``sqrt(scale² + Δ² / 12)``: a scale widened by the rounding error of targets recorded
        on a grid of step ``Δ`` (a uniform error of variance ``Δ² / 12``, see :class:`NLL`).
        """
        if not self.quantized:
            return scale
        return (scale.square() + self.resolution.square() / 12.0).sqrt()

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise log-density ``[..., T]`` of ``target`` (``[N, T]``, broadcast)."""
        raise NotImplementedError

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean negative log-density of ``target`` under the distributions of ``outputs``."""
        return -self.log_prob(outputs, target).mean()

    def output_width(self, num_targets: int) -> int:
        """Network outputs per point for ``num_targets`` targets: ``num_outputs * num_targets``
        (a criterion whose width is no per-target count, :class:`MultivariateNLL`, overrides it).
        """
        return self.num_outputs * num_targets

    def _split(self, outputs: Tensor, what: str) -> Tensor:
        """``[..., T * k] -> [..., T, k]`` with ``k = num_outputs``, or a clear error."""
        k = self.num_outputs
        if outputs.shape[-1] == 0 or outputs.shape[-1] % k != 0:
            raise ValueError(
                f"the network gives {outputs.shape[-1]} outputs per point, expected a multiple "
                f"of {k} ({what} per target) for {type(self).__name__}; set the network's "
                f"`n_outputs` to {k} times the number of targets"
            )
        return outputs.unflatten(-1, (-1, k))


class NLL(Likelihood):
    """Gaussian negative log-likelihood, averaged over all elements.

    With ``std=None`` (heteroscedastic) the network has 2 outputs per target, laid out
    target-major as :class:`PinballLoss` lays out its levels: ``[..., 2 T]`` holds
    ``(mean, scale)`` of target 0, then of target 1, ...; for one target ``[..., 0]`` is the mean
    and ``[..., 1]`` an unconstrained scale ``s`` with ``std = softplus(s) + min_std``.
    With a fixed ``std`` (known homoscedastic noise) the network has 1 output per target, the
    mean: ``[..., T]``.

    Outputs may carry leading sample dimensions (``[S, N, 2 T]``); the target ``[N, T]``
    broadcasts.

    Targets recorded on a grid (integer quality scores, prices rounded to cents) carry a
    rounding error: with ``resolution`` ``Δ`` the grid step, the observed target is a continuous
    one plus a uniform error on ``[-Δ/2, Δ/2]`` of variance ``Δ² / 12``, and the predicted std is
    ``sqrt(std² + Δ² / 12)``. Without it a Gaussian density on discrete targets is unbounded: the
    learned std can collapse onto training points that sit exactly on the grid, and a test point
    one step away scores a log-likelihood of minus hundreds (wine quality in the UCI benchmark).
    :func:`uq_box.datamodules.target_resolution` finds ``Δ`` from the training targets.

    With ``beta > 0`` the loss is the beta-NLL of Seitzer et al. (2022), "On the Pitfalls of
    Heteroscedastic Uncertainty Estimation with Probabilistic Neural Networks": each point's NLL
    is weighted by its predicted variance to the power ``beta``, ``stop_gradient(std^(2 beta))``,
    so that points with a large predicted variance do not stop the mean from fitting (``beta = 0``
    is the NLL, ``beta = 1`` gives the mean the gradient of the MSE; 0.5 is the paper's
    recommendation). :meth:`log_prob`, and so the predictive metrics, stay the Gaussian density.

    Args:
        std: known noise standard deviation, or ``None`` to learn it per input.
        min_std: floor added to the learned standard deviation.
        resolution: grid step ``Δ`` of the targets (0: continuous targets).
        beta: the beta-NLL exponent in ``[0, 1]`` (0: the plain NLL).
    """

    def __init__(
        self,
        std: float | None = None,
        min_std: float = 1e-6,
        resolution: float = 0.0,
        beta: float = 0.0,
    ) -> None:
        super().__init__()
        self.std = None if std is None else positive_finite(std, "std")
        self.beta = number_in(beta, "beta", 0.0, 1.0, closed="low high")
        self.min_std = non_negative_finite(min_std, "min_std")
        self._init_resolution(resolution)

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: 2 (mean, scale) or 1 (mean, with a fixed ``std``)."""
        return 1 if self.std is not None else 2

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., T * num_outputs] -> (mean [..., T], std [..., T])``."""
        if self.std is not None:
            mean = outputs
            std = torch.full_like(mean, self.std)
        else:
            if outputs.shape[-1] == 0 or outputs.shape[-1] % 2 != 0:
                raise ValueError(
                    f"the network gives {outputs.shape[-1]} outputs per point, expected an even "
                    f"number (a mean and a scale per target) for the heteroscedastic NLL"
                )
            pairs = outputs.unflatten(-1, (-1, 2))  # [..., T, (mean, scale)]
            mean = pairs[..., 0]
            std = softplus_std(pairs[..., 1], self.min_std)
        return mean, self.with_rounding(std)  # the rounding error (see the class docstring)

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise Gaussian log-density ``[..., T]`` (the rounding variance included)."""
        mean, std = self.mean_and_std(outputs)
        return -gaussian_nll_loss(mean, std, target)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean NLL of ``target`` under the Gaussians the ``outputs`` describe (beta-NLL with
        ``beta > 0``).
        """
        mean, std = self.mean_and_std(outputs)
        nll = gaussian_nll_loss(mean, std, target)
        if self.beta > 0:
            nll = nll * std.detach() ** (2.0 * self.beta)
        return nll.mean()

    def extra_repr(self) -> str:
        text = f"std={self.std}" if self.std is not None else f"min_std={self.min_std}"
        text += f", beta={self.beta}" if self.beta > 0 else ""
        # the step itself is a buffer (per stacked run), not part of the architecture
        return text + (", quantized targets" if self.quantized else "")


class MSE(nn.Module):
    """Mean squared error of a network with one output per target: a mean and no noise level."""

    num_outputs = 1

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, None]:
        """``[..., T] -> (mean [..., T], None)``."""
        return outputs, None

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean of ``(outputs - target)^2``."""
        return ((outputs - target) ** 2).mean()


def _scale(raw: Tensor, floor: float) -> Tensor:
    """A positive scale from an unconstrained output: ``softplus(raw) + floor``."""
    return F.softplus(raw) + floor


def student_t_log_prob(target: Tensor, loc: Tensor, scale: Tensor, df: Tensor) -> Tensor:
    """Elementwise log-density of the Student-t with ``df`` degrees of freedom, shapes broadcast."""
    z = (target - loc) / scale
    return (
        torch.lgamma((df + 1.0) / 2.0)
        - torch.lgamma(df / 2.0)
        - 0.5 * (torch.log(df) + LOG_PI)
        - torch.log(scale)
        - (df + 1.0) / 2.0 * torch.log1p(z.square() / df)
    )


class StudentTNLL(Likelihood):
    """Student-t negative log-likelihood: heavy tails, robust to outliers.

    Per target the network gives ``(loc, scale)`` with a fixed ``df``, or ``(loc, scale, df)``
    with ``df=None`` (learned per input, ``df = min_df + softplus(raw)``), target-major as
    :class:`NLL`; ``scale = softplus(raw) + min_scale``.

    Moments: the mean is ``loc``; the standard deviation ``scale * sqrt(df / (df - 2))`` exists
    only for ``df > 2`` (the variance is infinite for ``1 < df <= 2``, the mean too for
    ``df <= 1``). The prediction contract needs both, so a fixed ``df`` must exceed 2 and a
    learned one is kept above ``min_df > 2``: a ``df`` of 2 or less is refused with an error
    naming ``df`` (or ``min_df``).

    Args:
        df: the degrees of freedom (``> 2``), or ``None`` to learn them per input.
        min_scale: floor added to the learned scale.
        min_df: lower bound of a learned ``df`` (``> 2``; the std at ``df = min_df`` is
            ``scale * sqrt(min_df / (min_df - 2))``).
        resolution: grid step ``Δ`` of the targets (0: continuous); the scale becomes
            ``sqrt(scale² + Δ² / 12)`` as in :class:`NLL`, so that it cannot collapse onto
            targets recorded on a grid.
    """

    def __init__(
        self,
        df: float | None = None,
        min_scale: float = 1e-6,
        min_df: float = 2.5,
        resolution: float = 0.0,
    ) -> None:
        super().__init__()
        self._init_resolution(resolution)
        # df <= 2: infinite variance; df = inf: the Gaussian, NLL()
        self.df = None if df is None else number_in(df, "df", 2.0)
        self.min_scale = non_negative_finite(min_scale, "min_scale")
        self.min_df = number_in(min_df, "min_df", 2.0)

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: 2 (loc, scale) with a fixed ``df``, else 3."""
        return 2 if self.df is not None else 3

    def parameters_of(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(loc, scale, df)``, each ``[..., T]``."""
        parts = self._split(
            outputs, "a loc, a scale" + ("" if self.df is not None else " and a df")
        )
        loc, scale = parts[..., 0], self.with_rounding(_scale(parts[..., 1], self.min_scale))
        if self.df is not None:
            df = torch.full_like(loc, self.df)
        else:
            df = self.min_df + F.softplus(parts[..., 2])
        return loc, scale, df

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, scale * sqrt(df / (df - 2)))``."""
        loc, scale, df = self.parameters_of(outputs)
        return loc, scale * torch.sqrt(df / (df - 2.0))

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise Student-t log-density ``[..., T]``."""
        loc, scale, df = self.parameters_of(outputs)
        return student_t_log_prob(target, loc, scale, df)

    def extra_repr(self) -> str:
        df = f"df={self.df}" if self.df is not None else f"df learned, min_df={self.min_df}"
        return f"{df}, min_scale={self.min_scale}"


class LaplaceNLL(Likelihood):
    """Laplace negative log-likelihood (the absolute error with a learned scale).

    Per target ``(loc, scale)``, ``scale = softplus(raw) + min_scale``; density
    ``exp(-|y - loc| / scale) / (2 scale)``, mean ``loc``, std ``sqrt(2) scale``.

    Args:
        min_scale: floor added to the learned scale.
    """

    num_outputs = 2

    def __init__(self, min_scale: float = 1e-6) -> None:
        super().__init__()
        self.min_scale = non_negative_finite(min_scale, "min_scale")

    def parameters_of(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, scale)``, each ``[..., T]``."""
        parts = self._split(outputs, "a loc and a scale")
        return parts[..., 0], _scale(parts[..., 1], self.min_scale)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(loc, sqrt(2) scale)``."""
        loc, scale = self.parameters_of(outputs)
        return loc, math.sqrt(2.0) * scale

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise Laplace log-density ``[..., T]``."""
        loc, scale = self.parameters_of(outputs)
        return -math.log(2.0) - torch.log(scale) - (target - loc).abs() / scale

    def cdf(self, outputs: Tensor, value: Tensor) -> Tensor:
        """Elementwise Laplace CDF ``[..., T]`` at ``value`` (for quantiles)."""
        loc, scale = self.parameters_of(outputs)
        z = (value - loc) / scale
        return 0.5 - 0.5 * torch.sign(z) * torch.expm1(-z.abs())

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}"


def _in_functorch_transform() -> bool:
    """Inside ``torch.func.vmap`` (stacked runs) a value check is data-dependent control flow."""
    return torch._C._functorch.peek_interpreter_stack() is not None


class LogNormalNLL(Likelihood):
    """Log-normal negative log-likelihood, for positive targets.

    Per target ``(mu, sigma)`` of ``log y`` (``sigma = softplus(raw) + min_scale``); the density
    of ``y`` is the Gaussian's of ``log y`` divided by ``y``. Moments: mean
    ``exp(mu + sigma^2 / 2)``, variance ``(exp(sigma^2) - 1) exp(2 mu + sigma^2)``. A target of
    0 or below is outside the support: :meth:`log_prob` (and so the loss) raises an error naming
    the targets (not checked inside ``torch.func.vmap``, where it would be data-dependent).

    Args:
        min_scale: floor added to the learned ``sigma``.
    """

    num_outputs = 2

    def __init__(self, min_scale: float = 1e-6) -> None:
        super().__init__()
        self.min_scale = non_negative_finite(min_scale, "min_scale")

    def parameters_of(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, sigma)`` of ``log y``, each ``[..., T]``."""
        parts = self._split(outputs, "a mu and a sigma of log y")
        return parts[..., 0], _scale(parts[..., 1], self.min_scale)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """The log-normal's mean and standard deviation."""
        mu, sigma = self.parameters_of(outputs)
        var = sigma.square()
        mean = torch.exp(mu + var / 2.0)
        return mean, mean * torch.expm1(var).sqrt()

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise log-normal log-density ``[..., T]``; the targets must be positive."""
        if target.numel() and not _in_functorch_transform():
            low = float(target.min())
            if not low > 0:
                raise ValueError(
                    f"LogNormalNLL needs positive targets (the log-normal's support is y > 0), "
                    f"got a target of {low:g}; shift or rescale the targets, or use another "
                    f"`criterion` such as NLL()"
                )
        mu, sigma = self.parameters_of(outputs)
        log_y = torch.log(target)
        return -log_y - gaussian_nll_loss(mu, sigma, log_y)

    def cdf(self, outputs: Tensor, value: Tensor) -> Tensor:
        """Elementwise log-normal CDF ``[..., T]`` at ``value`` (0 at and below 0)."""
        mu, sigma = self.parameters_of(outputs)
        log_value = torch.log(value.clamp_min(torch.finfo(value.dtype).tiny))
        return torch.where(value > 0, torch.special.ndtr((log_value - mu) / sigma), 0.0)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}"


class GaussianMixtureNLL(Likelihood):
    """Negative log-likelihood of a mixture of ``K`` Gaussians (mixture density network).

    Bishop (1994), "Mixture Density Networks". Per target the network gives ``3 K`` outputs:
    ``K`` mixture logits (weights by softmax), ``K`` means and ``K`` unconstrained scales
    (``std = softplus(raw) + min_std``), laid out ``[..., T, 3, K]`` flattened target-major:
    ``[..., 3 K T]`` holds (logits, means, scales) of target 0, then of target 1, ...

    Moments (:meth:`mean_and_std`): the mixture's mean ``sum_k w_k mu_k`` and standard deviation,
    ``sum_k w_k (sigma_k^2 + mu_k^2) - mean^2``; :meth:`log_prob` is the mixture's log-density
    ``logsumexp_k(log w_k + log N(y | mu_k, sigma_k^2))``.

    Args:
        num_components: ``K >= 1``.
        min_std: floor added to each component's standard deviation.
        resolution: grid step ``Δ`` of the targets (0: continuous); each component's std
            becomes ``sqrt(std² + Δ² / 12)`` as in :class:`NLL`, so that no component can
            collapse onto one grid value.
    """

    def __init__(
        self, num_components: int = 2, min_std: float = 1e-6, resolution: float = 0.0
    ) -> None:
        super().__init__()
        self._init_resolution(resolution)
        self.num_components = positive_int(num_components, "num_components")
        self.min_std = non_negative_finite(min_std, "min_std")

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: ``3 K``."""
        return 3 * self.num_components

    def components(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(log weights, means, stds)``, each ``[..., T, K]``."""
        parts = self._split(outputs, f"{self.num_components} logits, means and scales")
        parts = parts.unflatten(-1, (3, self.num_components))
        log_weights = torch.log_softmax(parts[..., 0, :], dim=-1)
        stds = self.with_rounding(softplus_std(parts[..., 2, :], self.min_std))
        return log_weights, parts[..., 1, :], stds

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """The mixture's mean and standard deviation, each ``[..., T]``."""
        log_weights, means, stds = self.components(outputs)
        weights = log_weights.exp()
        mean = (weights * means).sum(-1)
        var = (weights * (stds.square() + (means - mean.unsqueeze(-1)).square())).sum(-1)
        return mean, var.sqrt()

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise mixture log-density ``[..., T]``."""
        log_weights, means, stds = self.components(outputs)
        per_component = -gaussian_nll_loss(means, stds, target.unsqueeze(-1))
        return torch.logsumexp(log_weights + per_component, dim=-1)

    def cdf(self, outputs: Tensor, value: Tensor) -> Tensor:
        """Elementwise mixture CDF ``[..., T]`` at ``value`` (for quantiles)."""
        log_weights, means, stds = self.components(outputs)
        z = (value.unsqueeze(-1) - means) / stds
        return (log_weights.exp() * torch.special.ndtr(z)).sum(-1)

    def extra_repr(self) -> str:
        return f"num_components={self.num_components}, min_std={self.min_std}"


def num_targets_of_width(width: int) -> int | None:
    """``T`` with ``T (T + 3) / 2 == width`` (``T`` means plus ``T (T + 1) / 2`` Cholesky
    entries), or ``None`` when no ``T >= 1`` fits.
    """
    if width < 2:
        return None
    num_targets = (math.isqrt(9 + 8 * width) - 3) // 2
    return num_targets if num_targets * (num_targets + 3) // 2 == width else None


class MultivariateNLL(Likelihood):
    """Negative log-likelihood of a multivariate Gaussian over all ``T`` targets (full covariance).

    The network gives, per point, the ``T`` means and the ``T (T + 1) / 2`` entries of the
    Cholesky factor ``L`` of the covariance ``Sigma = L L^T`` (a lower triangular matrix with a
    positive diagonal), ``T (T + 3) / 2`` outputs in all:

    - ``[..., :T]``: the means;
    - ``[..., T:]``: the lower triangle of ``L`` row by row (the order of
      ``torch.tril_indices(T, T)``: ``L_00, L_10, L_11, L_20, L_21, L_22, ...``); a diagonal
      entry is ``softplus(raw) + min_std``, an entry below the diagonal is the raw output itself.

    For ``T = 1`` that is ``(mean, scale)``, exactly :class:`NLL`'s layout and density; for
    ``T = 2`` the 5 outputs are ``(mu_0, mu_1, L_00, L_10, L_11)``. The diagonal head
    (``NLL()``) has ``2 T`` outputs; the full one adds the ``T (T - 1) / 2`` correlations. The
    width is no multiple of a per-target count, so :meth:`output_width` (used by the regression
    task's output check) gives it; :attr:`num_outputs` is the width for one target, 2.

    Moments: :meth:`mean_and_std` gives the means and the marginal standard deviations
    ``sqrt(diag Sigma)`` (each the norm of a row of ``L``), the ``[..., T]`` of the prediction
    contract; :meth:`covariance` the full ``Sigma`` ``[..., T, T]``. :meth:`log_prob` is the
    **joint** log-density of the ``T`` targets, one value per point ``[...]`` (not per target):
    ``-T/2 log(2 pi) - sum_t log L_tt - |L^-1 (y - mu)|^2 / 2`` (a triangular solve). The ``nll``
    metric divides the joint NLL by ``T``, a per-target figure comparable with a diagonal head's.

    Targets must be ``[..., T]`` with ``T`` the network's (``T >= 1``; one target as ``[N, 1]``,
    not ``[N]``).

    Args:
        min_std: floor added to each diagonal entry of ``L``.
    """

    num_outputs = 2

    def __init__(self, min_std: float = 1e-6) -> None:
        super().__init__()
        self.min_std = non_negative_finite(min_std, "min_std")

    def output_width(self, num_targets: int) -> int:
        """``T (T + 3) / 2``: ``T`` means and the ``T (T + 1) / 2`` entries of ``L``."""
        return num_targets * (num_targets + 3) // 2

    def num_targets(self, outputs: Tensor) -> int:
        """``T`` from the output width ``T (T + 3) / 2``, or an error naming ``n_outputs``."""
        width = outputs.shape[-1]
        num_targets = num_targets_of_width(width)
        if num_targets is None:
            raise ValueError(
                f"the network gives {width} outputs per point, which is no width of "
                f"MultivariateNLL: it needs T (T + 3) / 2 outputs for T >= 1 targets (T means "
                f"and the T (T + 1) / 2 entries of the covariance's Cholesky factor: 2 for 1 "
                f"target, 5 for 2, 9 for 3, 14 for 4); set the network's `n_outputs` to that"
            )
        return num_targets

    def parameters_of(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean [..., T], scale_tril [..., T, T])``, the Cholesky factor ``L`` of the covariance."""
        num_targets = self.num_targets(outputs)
        mean, entries = outputs[..., :num_targets], outputs[..., num_targets:]
        rows, cols = torch.tril_indices(num_targets, num_targets, device=outputs.device)
        on_diagonal = rows == cols
        entries = torch.where(on_diagonal, softplus_std(entries, self.min_std), entries)
        scale_tril = entries.new_zeros(*entries.shape[:-1], num_targets, num_targets)
        scale_tril[..., rows, cols] = entries
        return mean, scale_tril

    def covariance(self, outputs: Tensor) -> Tensor:
        """The covariance ``L L^T`` ``[..., T, T]``."""
        _, scale_tril = self.parameters_of(outputs)
        return scale_tril @ scale_tril.transpose(-1, -2)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean [..., T], marginal std sqrt(diag Sigma) [..., T])``."""
        mean, scale_tril = self.parameters_of(outputs)
        return mean, scale_tril.square().sum(-1).sqrt()

    def _check_target(self, target: Tensor, num_targets: int) -> None:
        if target.ndim < 2 or target.shape[-1] != num_targets:
            hint = (
                " (a 1-D target [N] is ambiguous: write one target as [N, 1])"
                if target.ndim == 1
                else ""
            )
            raise ValueError(
                f"MultivariateNLL needs targets [..., T] with T = {num_targets}, the network's "
                f"number of targets (its {self.output_width(num_targets)} outputs), got a target "
                f"of shape {tuple(target.shape)}{hint}"
            )

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Joint Gaussian log-density of the ``T`` targets, one value per point ``[...]``."""
        mean, scale_tril = self.parameters_of(outputs)
        num_targets = mean.shape[-1]
        self._check_target(target, num_targets)
        residual = target.to(mean.dtype) - mean  # [..., T], the target broadcast
        batch = torch.broadcast_shapes(residual.shape[:-1], scale_tril.shape[:-2])
        whitened = torch.linalg.solve_triangular(  # L^-1 (y - mu)
            scale_tril.expand(*batch, num_targets, num_targets),
            residual.expand(*batch, num_targets).unsqueeze(-1),
            upper=False,
        ).squeeze(-1)
        log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * num_targets * LOG_2PI - log_det - 0.5 * whitened.square().sum(-1)

    def sample(self, outputs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One draw ``mu + L z`` (``z`` standard normal) of each point's Gaussian ``[..., T]``."""
        mean, scale_tril = self.parameters_of(outputs)
        noise = torch.randn(
            mean.shape, generator=generator, dtype=mean.dtype, device=mean.device
        ).unsqueeze(-1)
        return mean + (scale_tril @ noise).squeeze(-1)

    def extra_repr(self) -> str:
        return f"min_std={self.min_std}"


class NormalInverseGammaNLL(Likelihood):
    """Deep evidential regression loss: Normal-inverse-gamma NLL plus the evidence regularizer.

    Amini, Schwarting, Soleimany & Rus (2020), "Deep Evidential Regression". Per target the
    network gives ``(gamma, nu, alpha, beta)`` of a Normal-inverse-gamma prior over the Gaussian's
    mean and variance, target-major (``nu = softplus + min_evidence``, ``alpha = 1 + softplus +
    min_evidence``, ``beta = softplus + min_evidence``). Its marginal likelihood is the Student-t
    ``St(y | gamma, beta (1 + nu) / (nu alpha), 2 alpha)``, which :meth:`log_prob` gives (equal to
    the paper's ``NLL``, eq. 8). The loss adds ``coeff * |y - gamma| (2 nu + alpha)`` (eq. 9).

    Uncertainty split (:meth:`variance_split`): aleatoric ``E[sigma^2] = beta / (alpha - 1)``,
    epistemic ``Var[mu] = beta / (nu (alpha - 1))``; they sum to the Student-t's variance, so
    :meth:`mean_and_std` is ``(gamma, sqrt(aleatoric + epistemic))`` (``alpha > 1``: finite).

    Args:
        coeff: ``lambda``, the weight of the evidence regularizer (``>= 0``).
        min_evidence: floor added to ``nu``, ``alpha - 1`` and ``beta``.
        resolution: grid step ``Δ`` of the targets (0: continuous); the Student-t's scale
            becomes ``sqrt(scale² + Δ² / 12)`` as in :class:`NLL` (the rounding error joins the
            aleatoric part), so that the evidence cannot pile up on targets recorded on a grid.
    """

    num_outputs = 4

    def __init__(
        self, coeff: float = 0.01, min_evidence: float = 1e-6, resolution: float = 0.0
    ) -> None:
        super().__init__()
        self._init_resolution(resolution)
        self.coeff = non_negative_finite(coeff, "coeff")
        self.min_evidence = non_negative_finite(min_evidence, "min_evidence")

    def parameters_of(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(gamma, nu, alpha, beta)``, each ``[..., T]``."""
        parts = self._split(outputs, "gamma, nu, alpha and beta")
        eps = self.min_evidence
        gamma = parts[..., 0]
        nu = F.softplus(parts[..., 1]) + eps
        alpha = 1.0 + F.softplus(parts[..., 2]) + eps
        beta = F.softplus(parts[..., 3]) + eps
        return gamma, nu, alpha, beta

    def variance_split(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(aleatoric variance beta / (alpha - 1), epistemic variance beta / (nu (alpha - 1)))``;
        with a grid step the aleatoric part also holds the rounding error,
        ``Δ² / 12 * alpha / (alpha - 1)``, so the two still sum to the Student-t's variance.
        """
        _, nu, alpha, beta = self.parameters_of(outputs)
        aleatoric = beta / (alpha - 1.0)
        epistemic = aleatoric / nu
        if self.quantized:
            aleatoric = aleatoric + self.resolution.square() / 12.0 * alpha / (alpha - 1.0)
        return aleatoric, epistemic

    def student_t(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The marginal's ``(loc gamma, scale, df 2 alpha)``, each ``[..., T]``; the scale is
        ``sqrt(beta (1 + nu) / (nu alpha))``, widened by the grid step's rounding error.
        """
        return self._marginal(*self.parameters_of(outputs))

    def _marginal(
        self, gamma: Tensor, nu: Tensor, alpha: Tensor, beta: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`student_t` from the parameters of :meth:`parameters_of`."""
        scale = self.with_rounding(torch.sqrt(beta * (1.0 + nu) / (nu * alpha)))
        return gamma, scale, 2.0 * alpha

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma, std of the Student-t marginal)``."""
        loc, scale, df = self.student_t(outputs)
        return loc, scale * torch.sqrt(df / (df - 2.0))

    def log_prob(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Elementwise log-density of the Student-t marginal ``[..., T]``."""
        loc, scale, df = self.student_t(outputs)
        return student_t_log_prob(target, loc, scale, df)

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean NIG NLL plus ``coeff`` times the mean evidence regularizer."""
        gamma, nu, alpha, beta = self.parameters_of(outputs)
        nll = -student_t_log_prob(target, *self._marginal(gamma, nu, alpha, beta)).mean()
        if self.coeff == 0:
            return nll
        return nll + self.coeff * ((target - gamma).abs() * (2.0 * nu + alpha)).mean()

    def extra_repr(self) -> str:
        return f"coeff={self.coeff}, min_evidence={self.min_evidence}"


def elbo_loss(data_nll: Tensor, kl: Tensor, num_training_points: int, beta: float = 1.0) -> Tensor:
    """Negative ELBO per training point, ``(N * data_nll + beta * KL) / N``.

    ``data_nll`` is the minibatch mean of the NLL (over points and Monte Carlo samples), so
    ``N * data_nll`` estimates the NLL summed over the whole training set without bias, and the KL
    is summed over every parameter (Blundell et al. 2015). Dividing by ``N`` leaves the optimum
    unchanged and keeps step sizes independent of the data set size.
    """
    return data_nll + beta * kl / num_training_points


def pinball_loss(quantile_pred: Tensor, target: Tensor, level: Tensor | float) -> Tensor:
    """Elementwise pinball (check) loss of Koenker & Bassett (1978), "Regression Quantiles".

    ``rho_q(r) = max(q r, (q - 1) r)`` of the residual ``r = target - quantile_pred``: under-
    predictions cost ``q`` per unit, over-predictions ``1 - q``, so its expectation is minimal at
    the ``q``-quantile of the target's distribution. Shapes broadcast.
    """
    residual = target - quantile_pred
    return torch.maximum(level * residual, (level - 1.0) * residual)


class PinballLoss(nn.Module):
    """Pinball loss over several quantile levels, averaged over levels, points and samples.

    The network gives one output per level and target, laid out ``[..., T * Q]`` (target-major:
    the ``Q`` levels of target 0, then of target 1, ...); for one target simply ``[..., Q]``.
    Averaging (rather than summing) over levels keeps the loss' scale independent of ``Q``; the
    minimizer is the same.

    As a regression criterion it also reads the outputs as a point prediction and a spread
    (:meth:`mean_and_std`): the median, and the standard deviation of the Gaussian whose
    ``q_lo``- and ``q_hi``-quantiles are the outer predicted quantiles,
    ``(upper - lower) / (z(q_hi) - z(q_lo))`` -- ``(upper - lower) / (2 z(q_hi))`` for a central
    interval such as ``(0.05, 0.95)``. Predicted quantiles are sorted first (the monotone
    rearrangement of Chernozhukov, Fernandez-Val & Galichon 2010), so crossing quantiles never
    give a negative width; training uses the raw outputs.

    Args:
        quantiles: strictly increasing levels in ``(0, 1)``. :meth:`mean_and_std` needs ``0.5``
            (the point prediction) and at least one other level.
        min_std: floor of the Gaussian-equivalent standard deviation.
    """

    def __init__(
        self,
        quantiles: tuple[float, ...] | list[float] = (0.05, 0.5, 0.95),
        min_std: float = 1e-6,
    ) -> None:
        super().__init__()
        try:
            levels = tuple(float(q) for q in quantiles)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`quantiles` must be a sequence of levels in (0, 1), got {quantiles!r}"
            ) from err
        if not levels or not all(0.0 < q < 1.0 for q in levels):
            raise ValueError(
                f"`quantiles` must be a non-empty sequence of levels in (0, 1), got {quantiles!r}"
            )
        if any(b <= a for a, b in zip(levels, levels[1:], strict=False)):
            raise ValueError(f"`quantiles` must be strictly increasing, got {quantiles!r}")
        self.quantiles = levels
        self.min_std = non_negative_finite(min_std, "min_std")
        self.register_buffer("levels", torch.tensor(levels), persistent=False)

    @property
    def num_outputs(self) -> int:
        """Network outputs per target: one per quantile level."""
        return len(self.quantiles)

    def _split_levels(self, outputs: Tensor) -> Tensor:
        """``[..., T * Q] -> [..., T, Q]`` (a clear error on a width that is no multiple of Q)."""
        num_levels = len(self.quantiles)
        if outputs.shape[-1] == 0 or outputs.shape[-1] % num_levels != 0:
            raise ValueError(
                f"the network gives {outputs.shape[-1]} outputs per point, expected a multiple "
                f"of len(`quantiles`) = {num_levels} (one output per quantile level and target)"
            )
        return outputs.unflatten(-1, (-1, num_levels))

    def quantile_outputs(self, outputs: Tensor) -> Tensor:
        """Predicted quantiles ``[..., T, Q]``, sorted along the levels."""
        return self._split_levels(outputs).sort(dim=-1).values

    def check_levels_for_prediction(self) -> None:
        """Raise unless the levels include the median and another level."""
        if 0.5 not in self.quantiles or len(self.quantiles) < 2:
            raise ValueError(
                f"`quantiles` must contain 0.5 (the median is the point prediction) and at least "
                f"one other level, got {self.quantiles}"
            )

    def gaussian_std(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Std of the Gaussian with ``lower``/``upper`` as its outer-level quantiles."""
        outer = torch.tensor([self.quantiles[0], self.quantiles[-1]], dtype=torch.float64)
        z_lo, z_hi = torch.special.ndtri(outer).tolist()
        return ((upper - lower) / (z_hi - z_lo)).clamp_min(self.min_std)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """``[..., T * Q] -> (median [..., T], Gaussian-equivalent std [..., T])``."""
        self.check_levels_for_prediction()
        quantiles = self.quantile_outputs(outputs)
        median = quantiles[..., self.quantiles.index(0.5)]
        return median, self.gaussian_std(quantiles[..., 0], quantiles[..., -1])

    def forward(self, outputs: Tensor, target: Tensor) -> Tensor:
        """Mean pinball loss of outputs ``[..., T * Q]`` against ``target`` ``[..., T]``."""
        quantiles = self._split_levels(outputs)
        levels = self.levels.to(quantiles.dtype)
        return pinball_loss(quantiles, target.unsqueeze(-1).to(quantiles.dtype), levels).mean()

    def extra_repr(self) -> str:
        return f"quantiles={self.quantiles}"
