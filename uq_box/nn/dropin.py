"""Drop-in replacements for ``torch.nn``: ``import uq_box.nn as vinn``, then ``vinn.Linear``.

The layers take ``torch.nn``'s arguments, in ``torch.nn``'s order, plus keyword-only Bayesian
ones, so a network written for ``torch.nn`` becomes a Bayes-by-Backprop network by swapping the
prefix (the flow of the ``vinn`` package)::

    import uq_box.nn as vinn
    from torch.distributions import Normal

    class Net(vinn.Module):                    # class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = vinn.Conv2d(1, 6, 3)   # nn.Conv2d(1, 6, 3)
            self.fc = vinn.Linear(216, 10, prior=Normal(0.0, 1.0))

    loss = criterion_sum(net(x), y) + net.kl / num_batches   # the minibatch ELBO

Every Bayesian layer and every :class:`Module` has a ``.kl``: the KL divergence of the posterior
from the prior summed over all Bayesian layers inside (:func:`uq_box.nn.kl_divergence`). The
posterior is a mean-field Gaussian (``posterior=Normal``, the only family offered); the prior is
any ``torch.distributions`` object (see :class:`uq_box.nn.Prior`). The default estimator is the
local reparameterization trick, as in ``vinn``; ``"reparameterization"`` and ``"flipout"`` are the
alternatives. Each call of a layer outside :func:`uq_box.nn.mc_sampling` draws new weights, so
every forward pass is one sample of the predictive distribution.
"""

from __future__ import annotations

from torch.distributions import Distribution, Normal

from uq_box.nn.layers import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianLinear,
    BayesianModule,
    _BayesianLayer,
)

__all__ = ["Conv1d", "Conv2d", "Conv3d", "Linear", "Module"]

DEFAULT_ESTIMATOR = "local"


class Module(BayesianModule):
    """``torch.nn.Module`` with a ``.kl`` property: the KL of every Bayesian layer inside.

    Subclass it in place of ``nn.Module``; everything else is ``nn.Module``'s.
    """


def _check_posterior(posterior: object) -> None:
    if posterior is None or posterior is Normal or isinstance(posterior, Normal):
        return
    name = getattr(posterior, "__name__", type(posterior).__name__)
    raise ValueError(
        f"`posterior` must be torch.distributions.Normal (mean-field Gaussian), got {name}"
    )


def _place(layer: _BayesianLayer, device: object, dtype: object) -> None:
    if device is not None or dtype is not None:
        layer.to(device=device, dtype=dtype)


class Linear(BayesianLinear):
    """Bayesian ``nn.Linear(in_features, out_features, bias=True, device=None, dtype=None)``.

    Args:
        in_features: as ``torch.nn.Linear``.
        out_features: as ``torch.nn.Linear``.
        bias: as ``torch.nn.Linear``.
        device: as ``torch.nn.Linear``.
        dtype: as ``torch.nn.Linear``.
        prior: prior of the weights and biases, a ``torch.distributions`` object (default
            ``Normal(0, 1)``); a number is the scale of a zero-mean Normal.
        posterior: the posterior family; only ``Normal`` (mean-field Gaussian).
        posterior_rho_init: initial ``rho`` of the posterior, ``sigma = softplus(rho)``.
        estimator: ``"local"`` (default), ``"reparameterization"`` or ``"flipout"``.
        num_kl_samples: Monte Carlo samples of the KL where no closed form exists.
        bias_prior: prior of the biases (default: ``prior``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: object = None,
        dtype: object = None,
        *,
        prior: Distribution | float | None = None,
        posterior: type[Distribution] | None = Normal,
        posterior_rho_init: float = -5.0,
        estimator: str = DEFAULT_ESTIMATOR,
        num_kl_samples: int = 1,
        bias_prior: Distribution | float | None = None,
    ) -> None:
        _check_posterior(posterior)
        super().__init__(
            in_features,
            out_features,
            bias=bias,
            prior=prior,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
            num_kl_samples=num_kl_samples,
            bias_prior=bias_prior,
        )
        _place(self, device, dtype)


class _DropInConvMixin:
    """``torch.nn.Conv*d``'s constructor on top of a Bayesian convolution."""

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
        padding_mode: str = "zeros",
        device: object = None,
        dtype: object = None,
        *,
        prior: Distribution | float | None = None,
        posterior: type[Distribution] | None = Normal,
        posterior_rho_init: float = -5.0,
        estimator: str = DEFAULT_ESTIMATOR,
        num_kl_samples: int = 1,
        bias_prior: Distribution | float | None = None,
    ) -> None:
        if padding_mode != "zeros":
            raise ValueError(
                f"`padding_mode` must be 'zeros' (the only one supported), got {padding_mode!r}"
            )
        _check_posterior(posterior)
        super().__init__(  # the Bayesian convolution's constructor
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            prior=prior,
            posterior_rho_init=posterior_rho_init,
            estimator=estimator,
            num_kl_samples=num_kl_samples,
            bias_prior=bias_prior,
        )
        _place(self, device, dtype)  # type: ignore[arg-type]


class Conv1d(_DropInConvMixin, BayesianConv1d):
    """Bayesian ``nn.Conv1d``: ``torch.nn``'s arguments plus the keyword-only ones of
    :class:`Linear` (``prior``, ``posterior``, ``posterior_rho_init``, ``estimator``, ...).
    """


class Conv2d(_DropInConvMixin, BayesianConv2d):
    """Bayesian ``nn.Conv2d``: ``torch.nn``'s arguments plus the keyword-only ones of
    :class:`Linear` (``prior``, ``posterior``, ``posterior_rho_init``, ``estimator``, ...).
    """


class Conv3d(_DropInConvMixin, BayesianConv3d):
    """Bayesian ``nn.Conv3d``: ``torch.nn``'s arguments plus the keyword-only ones of
    :class:`Linear` (``prior``, ``posterior``, ``posterior_rho_init``, ``estimator``, ...).
    """
