"""Mean-field Gaussian Bayesian layers, drop-in replacements for ``nn.Linear`` and ``nn.Conv*d``.

Every weight ``w`` has a posterior ``N(mu, sigma^2)`` with ``sigma = softplus(rho)`` (Blundell et
al. 2015, "Weight Uncertainty in Neural Networks"). Three gradient estimators:

- ``"reparameterization"``: sample the weights, ``w = mu + sigma * eps``; inside
  :func:`~uq_box.nn.sampling.mc_sampling` the ``S`` samples run as one batched matmul or grouped
  convolution.
- ``"local"``: the local reparameterization trick (Kingma, Salimans & Welling 2015, "Variational
  Dropout and the Local Reparameterization Trick") samples the pre-activations from their exact
  Gaussian, ``N(x mu^T, x^2 sigma^2^T)``: lower gradient variance, and the noise has the size of
  the activations ``[S, N, out]`` instead of the weights ``[S, out, in]``.
- ``"flipout"`` (Wen, Vicol, Ba, Tran & Grosse 2018, "Flipout: Efficient Pseudo-Independent
  Weight Perturbations on Mini-Batches"): one perturbation ``dW = sigma * eps`` per weight sample,
  shared by the batch, decorrelated between examples by random signs ``s_in``, ``s_out`` per
  example: ``out = x mu^T + ((x * s_in) dW^T) * s_out``. Each example sees the weights
  ``mu + dW * (s_out s_in^T)``, exactly distributed as ``N(mu, sigma^2)`` (the same marginal as
  ``"reparameterization"``), while the outputs of different examples are uncorrelated, so the
  gradient variance falls with the batch size as with ``"local"``. Unlike ``"local"`` it works for
  any weight distribution that is symmetric about its mean and keeps the weight-space sample.
  Signs are per example (shared over the positions of a convolution or the middle dimensions of
  a linear layer's input); the biases are sampled per example too.

Inside :func:`~uq_box.nn.sampling.mc_sampling`, a layer called twice in one forward pass uses the
same weight samples both times (tied weights; ``"local"`` samples outputs, so it draws per call),
and a ``noise_fn`` is asked for ``"weight"`` and
``"bias"`` noise of the parameter shapes with a leading ``S`` (``"reparameterization"``), for
``"output"`` noise ``[S, N, *output_shape]`` (``"local"``, whether the input is folded or not), or for ``"weight"`` ``[S, *weight_shape]`` and ``"bias"``,
``"sign_in"``, ``"sign_out"`` ``[R, features]`` with ``R = S * N`` the rows of the folded batch
(``"flipout"``; the signs are the signs of that noise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from uq_box.checks import positive_int
from uq_box.nn.priors import Prior, normal_kl
from uq_box.nn.sampling import MCState, SamplingModule, current_mc_state

ESTIMATORS = ("reparameterization", "local", "flipout")


class BayesianModule(nn.Module):
    """Base of the Bayesian layers: ``.kl`` is the KL of the layer's posterior from its prior."""

    @property
    def kl(self) -> Tensor:
        """KL divergence summed over this module and every Bayesian module inside it."""
        from uq_box.nn.kl import kl_divergence

        return kl_divergence(self)


class _BayesianLayer(BayesianModule, SamplingModule):
    """Shared parameters, sampling and KL of the Bayesian linear and convolution layers."""

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        prior: Distribution | float | None,
        posterior_rho_init: float,
        estimator: str,
        num_kl_samples: int,
        bias_prior: Distribution | float | None = None,
        out_features: int | None = None,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}")
        positive_int(num_kl_samples, "num_kl_samples")
        if not math.isfinite(posterior_rho_init):
            raise ValueError(f"`posterior_rho_init` must be finite, got {posterior_rho_init}")
        self.estimator = estimator
        self.num_kl_samples = num_kl_samples
        self.posterior_rho_init = posterior_rho_init
        self.prior = Prior(prior)
        # the biases' own prior (a submodule once set); None: the biases share ``self.prior``
        self.bias_prior: Prior | None = None if bias_prior is None else Prior(bias_prior)
        self.weight_mu = nn.Parameter(torch.empty(weight_shape))
        self.weight_rho = nn.Parameter(torch.empty(weight_shape))
        out_features = weight_shape[0] if out_features is None else out_features
        if bias:
            self.bias_mu = nn.Parameter(torch.empty(out_features))
            self.bias_rho = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Means as ``torch.nn``'s default initialization; ``rho`` at ``posterior_rho_init``."""
        nn.init.kaiming_uniform_(self.weight_mu, a=math.sqrt(5))
        nn.init.constant_(self.weight_rho, self.posterior_rho_init)
        if self.bias_mu is not None:
            fan_in = self.weight_mu[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            nn.init.uniform_(self.bias_mu, -bound, bound)
            nn.init.constant_(self.bias_rho, self.posterior_rho_init)

    def _load_from_state_dict(  # noqa: ANN001 -- torch's signature
        self, state_dict, prefix, *args
    ) -> None:
        """A checkpoint with a separate bias prior (e.g. after
        :func:`~uq_box.nn.posterior_as_prior`) loads into a layer built without one: the bias
        prior is created with the weight prior's family and takes the checkpoint's values.
        """
        if self.bias_prior is None and any(
            k.startswith(f"{prefix}bias_prior.") for k in state_dict
        ):
            self.bias_prior = Prior(self.prior.distribution())
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def weight_sigma(self) -> Tensor:
        """Posterior standard deviations of the weights."""
        return F.softplus(self.weight_rho)

    @property
    def bias_sigma(self) -> Tensor | None:
        """Posterior standard deviations of the biases (``None`` without bias)."""
        return None if self.bias_rho is None else F.softplus(self.bias_rho)

    def layer_kl(self) -> Tensor:
        """KL of this layer's own weights and biases from the prior."""
        prior = self.prior
        if (
            self.bias_mu is not None
            and self.bias_prior is None
            and prior.family is Normal
            and prior.loc.numel() == 1
            and prior.scale.numel() == 1
        ):  # one scalar Normal prior over both: one closed form, half the ops of two
            mu = torch.cat([self.weight_mu.flatten(), self.bias_mu])
            sigma = F.softplus(torch.cat([self.weight_rho.flatten(), self.bias_rho]))
            return normal_kl(mu, sigma, prior.loc, prior.scale).sum()
        kl = self.prior.kl_from(self.weight_mu, self.weight_sigma, self.num_kl_samples)
        if self.bias_mu is not None:
            prior = self.prior if self.bias_prior is None else self.bias_prior
            kl = kl + prior.kl_from(self.bias_mu, self.bias_sigma, self.num_kl_samples)
        return kl

    def _sample(self, name: str, state: MCState | None) -> Tensor:
        """Weights or biases ``mu + sigma * eps``: ``[S, *shape]`` in a context, else ``shape``."""
        mu, rho = getattr(self, f"{name}_mu"), getattr(self, f"{name}_rho")
        shape = tuple(mu.shape) if state is None else (state.num_samples, *mu.shape)
        eps = torch.randn_like(mu) if state is None else state.weight_noise(self, name, shape, mu)
        return torch.addcmul(mu, F.softplus(rho), eps)  # one fused pass over [S, *shape]

    def _apply_mean(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The deterministic operation (``F.linear`` or ``F.conv*d``) with the given weights."""
        raise NotImplementedError

    def _apply_samples(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, folded: bool
    ) -> Tensor:
        """The operation with ``S`` weight samples ``[S, *shape]`` on ``[N]`` or folded ``[S*N]``."""
        raise NotImplementedError

    @property
    def _features(self) -> tuple[int, int]:
        """``(input features, output features)``: the axes the flipout signs act on."""
        raise NotImplementedError

    def _per_row(self, values: Tensor, ndim: int) -> Tensor:
        """``[R, C]`` per-row values, broadcastable against an ``ndim`` activation ``[R, ...]``."""
        raise NotImplementedError

    def _flipout(self, x: Tensor, state: MCState | None) -> Tensor:
        """The flipout estimator (see the module docstring)."""
        in_features, out_features = self._features
        mean = self._apply_mean(x, self.weight_mu, None)
        if state is None:
            rows = x.shape[0]
            delta = self.weight_sigma * torch.randn_like(self.weight_mu)
            signs_in = torch.randn(rows, in_features, dtype=x.dtype, device=x.device).sign()
            signs_out = torch.randn(rows, out_features, dtype=x.dtype, device=x.device).sign()
            perturbation = self._apply_mean(x * self._per_row(signs_in, x.ndim), delta, None)
            bias_eps = None
            if self.bias_mu is not None:
                bias_eps = torch.randn(rows, out_features, dtype=x.dtype, device=x.device)
        else:
            num_samples = state.num_samples
            shape = (num_samples, *self.weight_mu.shape)
            eps = state.weight_noise(self, "weight", shape, self.weight_mu)
            delta = self.weight_sigma * eps
            if not state.input_folded:  # one copy of the batch per weight sample: [S * N, ...]
                mean, x = state.fold(mean), state.fold(x)
            rows = x.shape[0]
            signs_in = state.noise(self, "sign_in", (rows, in_features), x).sign()
            signs_out = state.noise(self, "sign_out", (rows, out_features), x).sign()
            perturbation = self._apply_samples(
                x * self._per_row(signs_in, x.ndim), delta, None, folded=True
            )
            bias_eps = None
            if self.bias_mu is not None:
                bias_eps = state.noise(self, "bias", (rows, out_features), x)
        out = mean + perturbation * self._per_row(signs_out, mean.ndim)
        if bias_eps is not None:
            bias = self.bias_mu + self.bias_sigma * bias_eps
            out = out + self._per_row(bias, out.ndim)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """One weight sample per call, or ``S`` of them inside ``mc_sampling`` (folded output)."""
        state = current_mc_state()
        if state is not None and state.input_folded:
            state.check_folded(x, self)
        if self.estimator == "flipout":
            return self._flipout(x, state)
        if self.estimator == "local":
            return self._local(x, state)
        weight = self._sample("weight", state)
        bias = None if self.bias_mu is None else self._sample("bias", state)
        if state is None:
            return self._apply_mean(x, weight, bias)
        return self._apply_samples(x, weight, bias, state.input_folded)

    def _local(self, x: Tensor, state: MCState | None) -> Tensor:
        """The local reparameterization (see the module docstring); the ``"output"`` noise is
        asked for as ``[S, N, ...]`` whether the input is folded or not.
        """
        mean = self._apply_mean(x, self.weight_mu, self.bias_mu)
        bias_var = None if self.bias_mu is None else self.bias_sigma**2
        var = self._apply_mean(x * x, self.weight_sigma**2, bias_var)
        std = var.clamp_min(1e-16).sqrt()
        if state is None:
            return mean + std * torch.randn_like(mean)
        num_samples = state.num_samples
        if state.input_folded:
            shape = (num_samples, mean.shape[0] // num_samples, *mean.shape[1:])
            return mean + std * state.noise(self, "output", shape, mean).reshape(mean.shape)
        eps = state.noise(self, "output", (num_samples, *mean.shape), mean)
        return (mean + std * eps).flatten(0, 1)


class BayesianLinear(_BayesianLayer):
    """Mean-field Gaussian ``nn.Linear``.

    Args:
        in_features: as ``nn.Linear``.
        out_features: as ``nn.Linear``.
        bias: as ``nn.Linear``.
        prior: prior of every weight and bias (default ``Normal(0, 1)``); a number is the scale of
            a zero-mean Normal.
        posterior_rho_init: initial ``rho``; ``sigma = softplus(rho)`` (-5 gives 0.0067).
        estimator: ``"reparameterization"``, ``"local"`` or ``"flipout"``.
        num_kl_samples: Monte Carlo samples of the KL where no closed form exists.
        bias_prior: prior of the biases (default: ``prior``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -5.0,
        estimator: str = "reparameterization",
        num_kl_samples: int = 1,
        bias_prior: Distribution | float | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        super().__init__(
            (out_features, in_features),
            bias,
            prior,
            posterior_rho_init,
            estimator,
            num_kl_samples,
            bias_prior,
        )

    @property
    def _features(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def _per_row(self, values: Tensor, ndim: int) -> Tensor:
        return values.reshape(values.shape[0], *([1] * (ndim - 2)), values.shape[-1])

    def _apply_mean(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def _apply_samples(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, folded: bool
    ) -> Tensor:
        num_samples = weight.shape[0]
        rows = x.shape[0] if folded else num_samples * x.shape[0]
        out_shape = (rows, *x.shape[1:-1], self.out_features)
        weight_t = weight.transpose(1, 2)  # [S, in, out]
        if folded:
            flat = x.reshape(num_samples, -1, self.in_features)
            out = (
                torch.bmm(flat, weight_t)
                if bias is None
                else torch.baddbmm(bias[:, None], flat, weight_t)
            )
        else:
            out = torch.matmul(x.reshape(1, -1, self.in_features), weight_t)
            if bias is not None:
                out = out + bias[:, None]
        return out.reshape(out_shape)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias_mu is not None}, estimator={self.estimator!r}"
        )


class _BayesianConvNd(_BayesianLayer):
    """Mean-field Gaussian convolution; ``S`` samples run as one grouped convolution."""

    dims: int

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -5.0,
        estimator: str = "reparameterization",
        num_kl_samples: int = 1,
        bias_prior: Distribution | float | None = None,
        output_padding: int | tuple[int, ...] = 0,
    ) -> None:
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"`in_channels` ({in_channels}) and `out_channels` ({out_channels}) must be "
                f"divisible by `groups` ({groups})"
            )
        kernel = _ntuple(kernel_size, self.dims)
        self.output_padding = _ntuple(output_padding, self.dims)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel
        self.stride = _ntuple(stride, self.dims)
        self.padding = padding if isinstance(padding, str) else _ntuple(padding, self.dims)
        self.dilation = _ntuple(dilation, self.dims)
        self.groups = groups
        super().__init__(
            self._weight_shape(in_channels, out_channels, groups, kernel),
            bias,
            prior,
            posterior_rho_init,
            estimator,
            num_kl_samples,
            bias_prior,
            out_channels,
        )

    @staticmethod
    def _weight_shape(
        in_channels: int, out_channels: int, groups: int, kernel: tuple[int, ...]
    ) -> tuple[int, ...]:
        return (out_channels, in_channels // groups, *kernel)

    @property
    def _features(self) -> tuple[int, int]:
        return self.in_channels, self.out_channels

    def _per_row(self, values: Tensor, ndim: int) -> Tensor:
        return values.reshape(*values.shape, *([1] * (ndim - 2)))

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _apply_mean(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return self._conv(x, weight, bias, self.groups)

    def _apply_samples(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, folded: bool
    ) -> Tensor:
        num_samples, groups = weight.shape[0], self.groups
        out_ch, kernel = self.out_channels, weight.shape[2:]
        if folded:
            # [S*N, C, ...] -> [N, S*C, ...]: one group per (sample, original group)
            batch = x.shape[0] // num_samples
            x = x.reshape(num_samples, batch, *x.shape[1:]).transpose(0, 1).flatten(1, 2)
            flat_bias = None if bias is None else bias.reshape(-1)
            out = self._conv(x, weight.reshape(-1, *kernel), flat_bias, num_samples * groups)
            out = out.reshape(batch, num_samples, out_ch, *out.shape[2:])
        else:
            # the same input for every sample: output channels ordered (group, sample, channel)
            batch = x.shape[0]
            per_group = out_ch // groups
            w = weight.reshape(num_samples, groups, per_group, *kernel).transpose(0, 1)
            b = None
            if bias is not None:
                b = bias.reshape(num_samples, groups, per_group).transpose(0, 1).reshape(-1)
            out = self._conv(x, w.reshape(-1, *kernel), b, groups)
            out = out.reshape(batch, groups, num_samples, per_group, *out.shape[2:])
            out = out.transpose(1, 2).reshape(batch, num_samples, out_ch, *out.shape[4:])
        return out.transpose(0, 1).flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
            f"bias={self.bias_mu is not None}, estimator={self.estimator!r}"
        )


class _BayesianConvTransposeNd(_BayesianConvNd):
    """Mean-field Gaussian transposed convolution (weights ``[in, out / groups, *kernel]``); ``S``
    samples run as one grouped transposed convolution.
    """

    @staticmethod
    def _weight_shape(
        in_channels: int, out_channels: int, groups: int, kernel: tuple[int, ...]
    ) -> tuple[int, ...]:
        return (in_channels, out_channels // groups, *kernel)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None, groups: int) -> Tensor:
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[self.dims - 1]
        return conv(
            x, weight, bias, self.stride, self.padding, self.output_padding, groups, self.dilation
        )

    def _apply_samples(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, folded: bool
    ) -> Tensor:
        num_samples = weight.shape[0]
        if not folded:
            x = x.unsqueeze(0).expand(num_samples, *x.shape).flatten(0, 1)
        # [S*N, C, ...] -> [N, S*C, ...]: input channels ordered (sample, channel), one group per
        # (sample, original group); the output channels come out ordered the same way
        batch = x.shape[0] // num_samples
        x = x.reshape(num_samples, batch, *x.shape[1:]).transpose(0, 1).flatten(1, 2)
        flat_bias = None if bias is None else bias.reshape(-1)
        out = self._conv(
            x, weight.flatten(0, 1), flat_bias, num_samples * self.groups
        )  # weight [S, in, out/g, k] -> [S * in, out/g, k]
        out = out.reshape(batch, num_samples, self.out_channels, *out.shape[2:])
        return out.transpose(0, 1).flatten(0, 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output_padding={self.output_padding}"


class BayesianConv1d(_BayesianConvNd):
    """Mean-field Gaussian ``nn.Conv1d`` (arguments as ``nn.Conv1d`` plus those of
    :class:`BayesianLinear`).
    """

    dims = 1


class BayesianConv2d(_BayesianConvNd):
    """Mean-field Gaussian ``nn.Conv2d`` (arguments as ``nn.Conv2d`` plus those of
    :class:`BayesianLinear`).
    """

    dims = 2


class BayesianConv3d(_BayesianConvNd):
    """Mean-field Gaussian ``nn.Conv3d`` (arguments as ``nn.Conv3d`` plus those of
    :class:`BayesianLinear`).
    """

    dims = 3


def _ntuple(value: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"expected an int or a tuple of {n} ints, got {value}")
    return value


class BayesianConvTranspose1d(_BayesianConvTransposeNd):
    """Mean-field Gaussian ``nn.ConvTranspose1d`` (arguments as ``nn.ConvTranspose1d`` plus those of
    :class:`BayesianLinear`; ``forward`` takes no ``output_size``: set ``output_padding``).
    """

    dims = 1


class BayesianConvTranspose2d(_BayesianConvTransposeNd):
    """Mean-field Gaussian ``nn.ConvTranspose2d`` (arguments as ``nn.ConvTranspose2d`` plus those of
    :class:`BayesianLinear`; ``forward`` takes no ``output_size``: set ``output_padding``).
    """

    dims = 2


class BayesianConvTranspose3d(_BayesianConvTransposeNd):
    """Mean-field Gaussian ``nn.ConvTranspose3d`` (arguments as ``nn.ConvTranspose3d`` plus those of
    :class:`BayesianLinear`; ``forward`` takes no ``output_size``: set ``output_padding``).
    """

    dims = 3
