"""Parameter-efficient ensembles: members as a tensor dimension inside one network.

Five ways to get ``M`` ensemble members for little more than the parameters (or the cost) of one
network, each a set of layers plus a conversion of any backbone's layers:

- **BatchEnsemble** (Wen, Tran & Ba 2020, "BatchEnsemble: an Alternative Approach to Efficient
  Ensemble and Lifelong Learning"): a shared weight ``W`` and per-member rank-1 "fast weights"
  ``r_m`` (input) and ``s_m`` (output), so member ``m``'s weight is ``W * (s_m r_m^T)``
  (:class:`BatchEnsembleLinear`, :class:`BatchEnsembleConv2d`, :func:`to_batch_ensemble`).
- **Rank-1 BNN** (Dusenberry et al. 2020, "Efficient and Scalable Bayesian Neural Nets with
  Rank-1 Factors"): the same parametrization with a Gaussian posterior over ``r_m`` and ``s_m``
  (a mixture of ``M`` Gaussians over the factors) and a deterministic ``W``
  (:class:`Rank1BayesianLinear`, :class:`Rank1BayesianConv2d`, :func:`to_rank1_bnn`,
  :func:`rank1_kl`).
- **Masksembles** (Durasov, Bagautdinov, Baque & Fua 2021, "Masksembles for Uncertainty
  Estimation"): ``M`` fixed binary channel masks with a controlled overlap
  (:func:`masksembles_masks`, :class:`MasksembleLayer`, :func:`to_masksembles`).
- **Packed-Ensembles** (Laurent et al. 2023, "Packed-Ensembles for Efficient Uncertainty
  Estimation"): ``M`` independent members of width ``alpha * C / M`` packed into grouped layers
  (:class:`PackedLinear`, :class:`PackedConv2d`, :func:`to_packed_ensemble`).
- **MIMO** (Havasi et al. 2021, "Training independent subnetworks for robust prediction"): one
  network whose first layer takes ``M`` inputs concatenated on the channel axis and whose last
  layer gives ``M`` outputs (:func:`to_mimo`, :class:`MIMOEnsemble`).

**Folded batches.** BatchEnsemble, the rank-1 BNN and Masksembles run their members on a folded
batch ``[M * B, ...]``, member-major (row ``m * B + b`` is member ``m``'s copy of point ``b``), as
the Monte Carlo samples of :mod:`uq_box.nn.sampling` are folded: :class:`FoldedEnsemble` repeats
the input ``M`` times, the network runs once on the folded batch (one matmul or convolution per
layer, no loop over members) and the output is unfolded to ``[M, B, ...]``. The layers between
the converted ones are shared by the members and must treat rows independently (BatchNorm in
training mode normalizes over the folded batch). Packed-Ensembles and MIMO need no folding: their
last layer gives the ``M`` members' outputs side by side on dimension 1, which
:class:`MemberOutputs` and :class:`MIMOEnsemble` move to a leading member dimension.

Everything here is plain ``torch.nn``: it works in any PyTorch loop without Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from uq_box.checks import number_in, positive_finite, positive_int
from uq_box.nn.convert import (
    disable_native_fast_paths,
    parameter_layers,
    resolve_module_names,
)
from uq_box.nn.priors import Prior

__all__ = [
    "BatchEnsembleConv1d",
    "BatchEnsembleConv2d",
    "BatchEnsembleLinear",
    "FoldedEnsemble",
    "MIMOEnsemble",
    "MasksembleLayer",
    "MemberOutputs",
    "PackedConv1d",
    "PackedConv2d",
    "PackedLinear",
    "Rank1BayesianConv1d",
    "Rank1BayesianConv2d",
    "Rank1BayesianLinear",
    "masksembles_masks",
    "rank1_kl",
    "to_batch_ensemble",
    "to_masksembles",
    "to_mimo",
    "to_packed_ensemble",
    "to_rank1_bnn",
]

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2}
_CONV_FN = {1: F.conv1d, 2: F.conv2d}


def _members_view(x: Tensor, num_members: int, layer: nn.Module) -> Tensor:
    """``[M * B, ...] -> [M, B, ...]``; a clear error for a batch that is not folded."""
    if x.shape[0] % num_members:
        raise ValueError(
            f"{type(layer).__name__} runs {num_members} members on a batch folded member-major, "
            f"[M * B, ...]; got {x.shape[0]} rows, not a multiple of {num_members} (wrap the "
            f"network in uq_box.nn.efficient.FoldedEnsemble, or repeat the input {num_members} "
            f"times along dimension 0)"
        )
    return x.unflatten(0, (num_members, -1))


def _per_member(values: Tensor, ndim: int, channel_dim: int) -> Tensor:
    """``[M, C]`` factors shaped to broadcast against ``[M, B, ...]`` with channels at
    ``channel_dim`` of the unfolded tensor (``-1`` for Linear, ``2`` for convolutions).
    """
    shape = [1] * ndim
    shape[0] = values.shape[0]
    shape[channel_dim] = values.shape[1]
    return values.reshape(shape)


def _random_signs(shape: tuple[int, ...]) -> Tensor:
    return torch.randint(0, 2, shape).float() * 2 - 1


# -- BatchEnsemble ------------------------------------------------------------------------------
class _BatchEnsembleLayer(nn.Module):
    """Shared weight, per-member fast weights ``r`` [M, in], ``s`` [M, out] and biases."""

    weight: Tensor
    channel_dim: int = -1

    def _init_factors(
        self, num_members: int, in_features: int, out_features: int, bias: bool
    ) -> None:
        self.num_members = positive_int(num_members, "num_members")
        # random sign initialization (Wen et al. 2020, appendix B): members differ from the start
        self.r = nn.Parameter(_random_signs((num_members, in_features)))
        self.s = nn.Parameter(_random_signs((num_members, out_features)))
        if bias:
            fan_in = self.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            self.bias = nn.Parameter(torch.empty(num_members, out_features).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)

    def _apply_shared(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _factor_means(self) -> tuple[Tensor, Tensor]:
        return self.r, self.s

    def member_weight(self, member: int) -> Tensor:
        """Member ``member``'s full weight ``W * (s_m r_m^T)`` (the posterior means' for a
        rank-1 layer), for tests and inspection.
        """
        w = self.weight
        r, s = (f[member] for f in self._factor_means())
        return w * s.reshape([-1] + [1] * (w.ndim - 1)) * r.reshape([1, -1] + [1] * (w.ndim - 2))

    def forward(self, x: Tensor) -> Tensor:
        """``[M * B, ...]`` (folded member-major) ``-> [M * B, ...]``."""
        xm = _members_view(x, self.num_members, self)
        ndim = xm.ndim
        channel_dim = self.channel_dim if self.channel_dim >= 0 else ndim + self.channel_dim
        r = _per_member(self.r, ndim, channel_dim)
        s = _per_member(self.s, ndim, channel_dim)
        h = self._apply_shared((xm * r).flatten(0, 1)).unflatten(0, (self.num_members, -1))
        if self.bias is None:
            return (h * s).flatten(0, 1)
        bias = _per_member(self.bias, ndim, channel_dim)
        return torch.addcmul(bias, h, s).flatten(0, 1)


class BatchEnsembleLinear(_BatchEnsembleLayer):
    """``M`` linear members sharing ``W``: member ``m`` computes ``s_m * (W (r_m * x)) + b_m``,
    i.e. the weight ``W * (s_m r_m^T)``, on its block of a folded batch ``[M * B, ..., in]``.

    One matmul for all members. ``r`` and ``s`` start as random signs.

    Args:
        in_features: input features.
        out_features: output features.
        num_members: ``M``.
        bias: a bias per member.
    """

    def __init__(
        self, in_features: int, out_features: int, num_members: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._init_factors(num_members, in_features, out_features, bias)

    def _apply_shared(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_members={self.num_members}, bias={self.bias is not None}"
        )


class _BatchEnsembleConvNd(_BatchEnsembleLayer):
    channel_dim = 2
    _dims = 2

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        num_members: int,
        stride: int | tuple[int, ...] = 1,
        padding: int | str | tuple[int, ...] = 0,
        dilation: int | tuple[int, ...] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        dims = self._dims
        self.kernel_size = nn.modules.utils._ntuple(dims)(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self._init_factors(num_members, in_channels, out_channels, bias)

    def _apply_shared(self, x: Tensor) -> Tensor:
        conv = _CONV_FN[self._dims]
        return conv(x, self.weight, None, self.stride, self.padding, self.dilation)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, num_members={self.num_members}, "
            f"bias={self.bias is not None}"
        )


class BatchEnsembleConv1d(_BatchEnsembleConvNd):
    """1d convolution with BatchEnsemble fast weights (see :class:`BatchEnsembleConv2d`)."""

    _dims = 1


class BatchEnsembleConv2d(_BatchEnsembleConvNd):
    """``M`` convolution members sharing the kernel ``W``: member ``m`` scales its input channels
    by ``r_m`` and its output channels by ``s_m`` (kernel ``W * (s_m r_m^T)``) and adds ``b_m``,
    on its block of a folded batch ``[M * B, C, H, W]``; one convolution for all members.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: as ``nn.Conv2d``.
        num_members: ``M``.
        stride: as ``nn.Conv2d``.
        padding: as ``nn.Conv2d``.
        dilation: as ``nn.Conv2d``.
        bias: a bias per member.
    """

    _dims = 2


# -- rank-1 BNN -----------------------------------------------------------------------------------
class _Rank1Layer(_BatchEnsembleLayer):
    """BatchEnsemble layer whose factors have a Gaussian posterior, sampled per row."""

    def _init_posterior(
        self, prior: Distribution | float | None, posterior_rho_init: float, init_std: float
    ) -> None:
        if not math.isfinite(posterior_rho_init):
            raise ValueError(f"`posterior_rho_init` must be finite, got {posterior_rho_init}")
        self.prior = Prior(rank1_prior(prior))
        r, s = self.r.detach(), self.s.detach()
        del self.r, self.s
        # posterior means around 1 with random signs of the BatchEnsemble init, scaled down
        self.r_mu = nn.Parameter(1.0 + init_std * r * torch.rand_like(r))
        self.s_mu = nn.Parameter(1.0 + init_std * s * torch.rand_like(s))
        self.r_rho = nn.Parameter(torch.full_like(r, posterior_rho_init))
        self.s_rho = nn.Parameter(torch.full_like(s, posterior_rho_init))

    def _factor_means(self) -> tuple[Tensor, Tensor]:
        return self.r_mu, self.s_mu

    def forward(self, x: Tensor) -> Tensor:
        """``[M * R, ...] -> [M * R, ...]`` with fresh factor samples for every row."""
        xm = _members_view(x, self.num_members, self)
        ndim = xm.ndim
        channel_dim = self.channel_dim if self.channel_dim >= 0 else ndim + self.channel_dim
        rows = xm.shape[1]

        def sample(mu: Tensor, rho: Tensor) -> Tensor:
            eps = torch.randn(mu.shape[0], rows, mu.shape[1], dtype=mu.dtype, device=mu.device)
            value = torch.addcmul(mu.unsqueeze(1), F.softplus(rho).unsqueeze(1), eps)
            shape = [1] * ndim
            shape[0], shape[1], shape[channel_dim] = mu.shape[0], rows, mu.shape[1]
            return value.reshape(shape)

        r, s = sample(self.r_mu, self.r_rho), sample(self.s_mu, self.s_rho)
        h = self._apply_shared((xm * r).flatten(0, 1)).unflatten(0, (self.num_members, -1))
        if self.bias is None:
            return (h * s).flatten(0, 1)
        return torch.addcmul(_per_member(self.bias, ndim, channel_dim), h, s).flatten(0, 1)

    def layer_kl(self) -> Tensor:
        """KL of the factors' posterior from the prior, averaged over the ``M`` components.

        The posterior is the uniform mixture of the members' Gaussians; by convexity its KL is at
        most the mean of the components' KLs, so the loss stays an upper bound of the negative
        ELBO.
        """
        mu = torch.cat([self.r_mu.flatten(), self.s_mu.flatten()])
        sigma = F.softplus(torch.cat([self.r_rho.flatten(), self.s_rho.flatten()]))
        return self.prior.kl_from(mu, sigma) / self.num_members


def rank1_prior(prior: Distribution | float | None) -> Distribution:
    """The prior of rank-1 factors: ``None`` is ``Normal(1, 1)``, a number ``s`` is
    ``Normal(1, s)``, a distribution is taken as it is.
    """
    if prior is None:
        return Normal(1.0, 1.0)
    if isinstance(prior, Distribution):
        return prior
    return Normal(1.0, positive_finite(prior, "prior"))


class Rank1BayesianLinear(_Rank1Layer, BatchEnsembleLinear):
    """BatchEnsemble linear layer with Gaussian rank-1 factors (Dusenberry et al. 2020).

    Member ``m``'s weight is ``W * (s r^T)`` with ``r ~ N(r_mu_m, softplus(r_rho_m)^2)`` and
    ``s`` likewise, drawn afresh for every row of the folded batch; ``W`` and the per-member
    biases are point estimates. :meth:`layer_kl` is the KL of the factors from ``prior``.

    Args:
        in_features: input features.
        out_features: output features.
        num_members: ``M``.
        bias: a bias per member.
        prior: prior of every factor; a number ``s`` means ``Normal(1, s)`` (default
            ``Normal(1, 1)``).
        posterior_rho_init: initial ``rho`` of the factors (``sigma = softplus(rho)``).
        init_std: spread of the posterior means around 1 at initialization (random signs).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_members: int,
        bias: bool = True,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -3.0,
        init_std: float = 0.5,
    ) -> None:
        BatchEnsembleLinear.__init__(self, in_features, out_features, num_members, bias)
        self._init_posterior(prior, posterior_rho_init, init_std)


class _Rank1Conv(_Rank1Layer):
    """The constructor of :class:`Rank1BayesianConv1d` and :class:`Rank1BayesianConv2d`: the
    BatchEnsemble convolution of their bases, then the posterior of the factors.
    """

    def __init__(
        self,
        *args: object,
        prior: Distribution | float | None = None,
        posterior_rho_init: float = -3.0,
        init_std: float = 0.5,
        **kwargs: object,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._init_posterior(prior, posterior_rho_init, init_std)


class Rank1BayesianConv1d(_Rank1Conv, BatchEnsembleConv1d):
    """1d convolution with Gaussian rank-1 factors (see :class:`Rank1BayesianConv2d`)."""


class Rank1BayesianConv2d(_Rank1Conv, BatchEnsembleConv2d):
    """Convolution with Gaussian rank-1 factors over input and output channels (Dusenberry et
    al. 2020); arguments of :class:`BatchEnsembleConv2d` plus ``prior``, ``posterior_rho_init``
    and ``init_std`` of :class:`Rank1BayesianLinear`.
    """


def rank1_kl(model: nn.Module) -> Tensor:
    """Sum of :meth:`Rank1BayesianLinear.layer_kl` over the rank-1 layers of ``model``."""
    terms = [m.layer_kl() for m in model.modules() if isinstance(m, _Rank1Layer)]
    if terms:
        return torch.stack(terms).sum()
    reference = next(model.parameters())
    return torch.zeros((), dtype=reference.dtype, device=reference.device)


# -- conversions of chosen layers ---------------------------------------------------------------
def _choose(
    model: nn.Module, module_names: Sequence[int] | Sequence[str] | None, what: str
) -> list[str]:
    """Dotted names of the Linear/Conv1d/Conv2d layers to convert (``None``: all of them)."""
    supported = (nn.Linear, *_CONVS)
    if module_names is None:
        names = [name for name, m in parameter_layers(model) if type(m) in supported]
        if not names:
            raise ValueError(
                f"{what}: the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer to convert"
            )
        return names
    names = resolve_module_names(model, module_names)
    modules = dict(model.named_modules())
    for name in names:
        if type(modules[name]) not in supported:
            raise ValueError(
                f"{what}: layer {name!r} is a {type(modules[name]).__name__}; only nn.Linear, "
                f"nn.Conv1d and nn.Conv2d layers can be converted"
            )
    return names


def _check_conv(name: str, conv: nn.Module, what: str) -> None:
    if type(conv) not in _CONVS:
        return
    if conv.groups != 1:
        raise ValueError(
            f"{what}: layer {name!r} is a grouped convolution (groups={conv.groups}); only "
            f"groups=1 is supported"
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{what}: layer {name!r} uses padding_mode={conv.padding_mode!r}; only 'zeros' is "
            f"supported"
        )


def _replace(model: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Swap every reference to a replaced module (tied layers stay tied)."""
    if id(model) in replacements:
        return replacements[id(model)]
    slots = [
        (parent, child_name, id(child))
        for parent in model.modules()
        for child_name, child in parent._modules.items()
        if id(child) in replacements
    ]
    for parent, child_name, key in slots:  # after the walk: a new module may hold the old one
        setattr(parent, child_name, replacements[key])
    return model


def _batch_ensemble_layer(old: nn.Module, num_members: int, rank1: dict | None) -> nn.Module:
    bias = old.bias is not None
    if isinstance(old, nn.Linear):
        args = (old.in_features, old.out_features, num_members, bias)
        new = BatchEnsembleLinear(*args) if rank1 is None else Rank1BayesianLinear(*args, **rank1)
    else:
        dims = _CONVS[type(old)]
        kwargs = dict(stride=old.stride, padding=old.padding, dilation=old.dilation, bias=bias)
        args = (old.in_channels, old.out_channels, old.kernel_size, num_members)
        cls = {
            (1, False): BatchEnsembleConv1d,
            (2, False): BatchEnsembleConv2d,
            (1, True): Rank1BayesianConv1d,
            (2, True): Rank1BayesianConv2d,
        }[(dims, rank1 is not None)]
        new = cls(*args, **kwargs, **(rank1 or {}))
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if bias:
            new.bias.copy_(old.bias.expand_as(new.bias))
    return new


def to_batch_ensemble(
    model: nn.Module,
    num_members: int,
    module_names: Sequence[int] | Sequence[str] | None = None,
) -> nn.Module:
    """Replace the chosen ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layers by BatchEnsemble
    layers of ``num_members`` members, in place.

    The shared weights start as the layers' current weights, the fast weights as random signs.
    ``module_names`` picks layers as ``stochastic_module_names`` does elsewhere (ints index the
    parameter-owning layers, strings are dotted names, ``None`` is every supported layer); any
    other layer type named is an error. The converted network expects a folded batch: wrap it in
    :class:`FoldedEnsemble`.
    """
    positive_int(num_members, "num_members")
    return _convert_factors(model, num_members, module_names, None, "to_batch_ensemble")


def to_rank1_bnn(
    model: nn.Module,
    num_members: int,
    module_names: Sequence[int] | Sequence[str] | None = None,
    prior: Distribution | float | None = None,
    posterior_rho_init: float = -3.0,
    init_std: float = 0.5,
) -> nn.Module:
    """Replace the chosen layers by rank-1 Bayesian layers (:class:`Rank1BayesianLinear`,
    :class:`Rank1BayesianConv2d`), in place; arguments as :func:`to_batch_ensemble` plus the
    factors' ``prior``, ``posterior_rho_init`` and ``init_std``.
    """
    positive_int(num_members, "num_members")
    rank1 = {"prior": prior, "posterior_rho_init": posterior_rho_init, "init_std": init_std}
    return _convert_factors(model, num_members, module_names, rank1, "to_rank1_bnn")


def _convert_factors(
    model: nn.Module,
    num_members: int,
    module_names: Sequence[int] | Sequence[str] | None,
    rank1: dict | None,
    what: str,
) -> nn.Module:
    names = _choose(model, module_names, what)
    modules = dict(model.named_modules())
    for name in names:
        _check_conv(name, modules[name], what)
    replacements = {
        id(modules[n]): _batch_ensemble_layer(modules[n], num_members, rank1) for n in names
    }
    return _off_fast_paths(_replace(model, replacements))


def _off_fast_paths(model: nn.Module) -> nn.Module:
    """Transformer blocks holding ensemble layers run their Python path: the fused kernel
    reads ``linear1.weight`` and its bias directly (members' biases ``[M, out]``, a masked layer
    without ``weight``).
    """
    disable_native_fast_paths(model, (_BatchEnsembleLayer, MasksembleLayer))
    return model


class FoldedEnsemble(nn.Module):
    """Run a network of BatchEnsemble, rank-1 or Masksembles layers on ``M`` copies of the
    input as one folded batch: ``[B, ...] -> [M * K, B, ...]``.

    ``forward(x, num_samples=K)`` repeats ``x`` ``M * K`` times member-major (rows ``m * K * B``
    to ``(m + 1) * K * B`` are member ``m``'s), so a rank-1 layer draws ``K`` factor samples per
    member and point; deterministic members give ``K`` equal copies (use ``K = 1``).

    Args:
        model: the converted network.
        num_members: ``M``.
    """

    def __init__(self, model: nn.Module, num_members: int) -> None:
        super().__init__()
        self.model = model
        self.num_members = positive_int(num_members, "num_members")

    def forward(self, x: Tensor, num_samples: int = 1) -> Tensor:
        rows = self.num_members * num_samples
        n = x.shape[0]
        folded = x.unsqueeze(0).expand(rows, *x.shape).reshape(rows * n, *x.shape[1:])
        return self.model(folded).unflatten(0, (rows, n))


# -- Masksembles ---------------------------------------------------------------------------------
def masksembles_masks(channels: int, num_masks: int, scale: float, seed: int = 0) -> Tensor:
    """``num_masks`` binary masks over ``channels`` channels, as Durasov et al. 2021 generate
    them: ``[num_masks, channels]`` of 0/1.

    Each mask has the same number ``m = int(channels / (scale * (1 - (1 - 1/scale)^n)))`` of
    ones (fewer for a larger ``scale``), drawn uniformly among ``T`` positions; positions no
    mask uses are dropped, and draws are kept when exactly ``channels`` positions remain. The
    result is uniform over sets of ``m``-subsets that cover every channel, whatever ``T`` (it is
    chosen so that such draws are likely). ``scale=1`` gives ``num_masks`` equal all-ones masks
    (one model); a larger ``scale`` less overlap (about ``1 / scale`` of a mask's channels are
    shared with another mask). The masks are a deterministic function of the arguments.

    Args:
        channels: channels ``C`` the masks cover.
        num_masks: ``M``.
        scale: ``>= 1``; controls the overlap.
        seed: seed of the draws.
    """
    positive_int(channels, "channels")
    n = positive_int(num_masks, "num_masks")
    scale = number_in(scale, "scale", 1.0, closed="low")
    covered = 1.0 - (1.0 - 1.0 / scale) ** n
    ones = max(1, int(channels / (scale * covered)))
    if ones >= channels:
        return torch.ones(n, channels)
    if ones * n < channels:  # int() rounded down below a cover
        ones = math.ceil(channels / n)
    # positions T whose expected number of used positions T (1 - (1 - m/T)^n) is nearest C
    candidates = sorted(
        range(channels, 8 * channels + 8),
        key=lambda t: abs(t * (1.0 - (1.0 - ones / t) ** n) - channels),
    )[:5]
    generator = torch.Generator().manual_seed(seed)
    for attempt in range(5000):
        total = candidates[attempt % len(candidates)]
        keys = torch.rand(n, total, generator=generator)
        masks = torch.zeros(n, total)
        masks.scatter_(1, keys.argsort(1)[:, :ones], 1.0)
        used = masks.amax(0) > 0
        if int(used.sum()) == channels:
            return masks[:, used]
    raise ValueError(
        f"could not generate {n} Masksembles masks of {ones} ones covering exactly {channels} "
        f"channels (scale={scale}); try another `scale` or more channels"
    )


class MasksembleLayer(nn.Module):
    """Multiply member ``m``'s block of a folded batch ``[M * B, ...]`` by the fixed binary mask
    ``masks[m]`` over the channels (dimension 1 of a convolution's output, the last of a linear
    layer's); see :func:`masksembles_masks`.

    The masks are a buffer (they are in the ``state_dict``) and are the same in training and
    evaluation.

    Args:
        channels: channels ``C``.
        num_masks: ``M``.
        scale: overlap control, ``>= 1``.
        channel_dim: ``1`` (convolution outputs) or ``-1`` (linear outputs).
        seed: seed of the masks.
    """

    def __init__(
        self, channels: int, num_masks: int, scale: float, channel_dim: int = -1, seed: int = 0
    ) -> None:
        super().__init__()
        if channel_dim not in (1, -1):
            raise ValueError(f"`channel_dim` must be 1 or -1, got {channel_dim!r}")
        self.num_masks, self.scale, self.channel_dim = num_masks, scale, channel_dim
        self.register_buffer("masks", masksembles_masks(channels, num_masks, scale, seed))

    def forward(self, x: Tensor) -> Tensor:
        xm = _members_view(x, self.num_masks, self)
        channel_dim = xm.ndim - 1 if self.channel_dim == -1 else 2
        masks = _per_member(self.masks.to(x.dtype), xm.ndim, channel_dim)
        return (xm * masks).flatten(0, 1)

    def extra_repr(self) -> str:
        return (
            f"channels={self.masks.shape[1]}, num_masks={self.num_masks}, scale={self.scale}, "
            f"channel_dim={self.channel_dim}"
        )


def to_masksembles(
    model: nn.Module,
    num_masks: int,
    scale: float = 2.0,
    module_names: Sequence[int] | Sequence[str] | None = None,
) -> nn.Module:
    """Put a :class:`MasksembleLayer` after the outputs of the chosen layers, in place.

    Each chosen ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` layer ``name`` becomes
    ``nn.Sequential(layer, MasksembleLayer(...))`` (its parameters are then ``name.0.weight``,
    ...). The mask multiplies the layer's output before the activation, which for ReLU-like
    activations equals masking after it. ``None`` picks every supported layer but the last
    parameter-owning one (the output). Wrap the result in :class:`FoldedEnsemble`.
    """
    positive_int(num_masks, "num_masks")
    if module_names is None:
        layers = parameter_layers(model)
        names = [name for name, m in layers[:-1] if type(m) in (nn.Linear, *_CONVS)]
        if not names:
            raise ValueError(
                "to_masksembles: the model has no nn.Linear, nn.Conv1d or nn.Conv2d layer before "
                "its output layer; name the layers with `module_names`"
            )
    else:
        names = _choose(model, module_names, "to_masksembles")
    modules = dict(model.named_modules())
    replacements = {}
    for index, name in enumerate(names):
        layer = modules[name]
        width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        mask = MasksembleLayer(
            width,
            num_masks,
            scale,
            channel_dim=-1 if isinstance(layer, nn.Linear) else 1,
            seed=index,
        )
        replacements[id(layer)] = nn.Sequential(layer, mask.to(layer.weight.device))
    return _off_fast_paths(_replace(model, replacements))


# -- Packed-Ensembles -----------------------------------------------------------------------------
class PackedLinear(nn.Module):
    """``M`` independent linear members packed in one block-diagonal (grouped) layer.

    Member ``m`` owns the ``m``-th block of ``width / M`` input and output features; with
    ``gamma > 1`` each member is split into ``gamma`` groups more (Laurent et al. 2023). The
    first layer of a packed network (``first=True``) takes the shared input as it is (one
    group, ``in_features`` inputs); the last (``last=True``) gives ``M * out_features`` outputs,
    member-major. Otherwise both widths are multiplied by ``alpha``.

    Args:
        in_features: input features of one model (before ``alpha``).
        out_features: output features of one model.
        num_members: ``M``.
        alpha: width factor.
        gamma: groups per member.
        first: the network's first layer.
        last: the network's last layer.
        bias: with biases.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_members: int,
        alpha: int = 2,
        gamma: int = 1,
        first: bool = False,
        last: bool = False,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.num_members = positive_int(num_members, "num_members")
        alpha, gamma = positive_int(alpha, "alpha"), positive_int(gamma, "gamma")
        self.in_features = in_features if first else in_features * alpha
        self.out_features = out_features * num_members if last else out_features * alpha
        self.groups = 1 if first else num_members * (1 if last else gamma)
        for label, width in (("input", self.in_features), ("output", self.out_features)):
            if width % self.groups:
                raise ValueError(
                    f"PackedLinear: {width} {label} features do not split into {self.groups} "
                    f"groups (num_members={num_members}, gamma={gamma}); choose `alpha` or "
                    f"`gamma` so that they do"
                )
        g = self.groups
        self.weight = nn.Parameter(torch.empty(g, self.out_features // g, self.in_features // g))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        fan_in = self.in_features // g
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)  # torch's default for a Linear of fan_in
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, ..., in] -> [B, ..., out]``."""
        if self.groups == 1:
            return F.linear(x, self.weight[0], self.bias)
        xg = x.unflatten(-1, (self.groups, -1))  # [..., G, in/G]
        out = torch.einsum("...gi,goi->...go", xg, self.weight).flatten(-2)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"groups={self.groups}, num_members={self.num_members}"
        )


def _packed_conv_sizes(
    cls_name: str,
    in_channels: int,
    out_channels: int,
    num_members: int,
    alpha: int,
    gamma: int,
    first: bool,
    last: bool,
) -> tuple[int, int, int]:
    positive_int(num_members, "num_members")
    alpha, gamma = positive_int(alpha, "alpha"), positive_int(gamma, "gamma")
    cin = in_channels if first else in_channels * alpha
    cout = out_channels * num_members if last else out_channels * alpha
    groups = 1 if first else num_members * (1 if last else gamma)
    for label, width in (("input", cin), ("output", cout)):
        if width % groups:
            raise ValueError(
                f"{cls_name}: {width} {label} channels do not split into {groups} groups "
                f"(num_members={num_members}, gamma={gamma}); choose `alpha` or `gamma` so that "
                f"they do"
            )
    return cin, cout, groups


class _PackedConv:
    """The constructor of :class:`PackedConv1d` and :class:`PackedConv2d` (before the
    ``nn.Conv*d`` in their bases).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        num_members: int,
        alpha: int = 2,
        gamma: int = 1,
        first: bool = False,
        last: bool = False,
        **kwargs: object,
    ) -> None:
        cin, cout, groups = _packed_conv_sizes(
            type(self).__name__, in_channels, out_channels, num_members, alpha, gamma, first, last
        )
        super().__init__(cin, cout, kernel_size, groups=groups, **kwargs)
        self.num_members = num_members


class PackedConv1d(_PackedConv, nn.Conv1d):
    """1d convolution of ``M`` packed members (see :class:`PackedConv2d`)."""


class PackedConv2d(_PackedConv, nn.Conv2d):
    """``M`` independent convolution members packed in one grouped ``nn.Conv2d`` (Laurent et
    al. 2023): ``alpha * C`` channels in ``M * gamma`` groups, member ``m`` owning the ``m``-th
    block of channels; ``first`` takes the shared input (one group), ``last`` gives
    ``M * out_channels`` channels, member-major.

    Args:
        in_channels: input channels of one model (before ``alpha``).
        out_channels: output channels of one model.
        kernel_size: as ``nn.Conv2d``.
        num_members: ``M``.
        alpha: width factor.
        gamma: groups per member.
        first: the network's first layer.
        last: the network's last layer.
        **kwargs: ``stride``, ``padding``, ``dilation``, ``bias`` of ``nn.Conv2d``.
    """


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def to_packed_ensemble(
    model: nn.Module, num_members: int, alpha: int = 2, gamma: int = 1
) -> nn.Module:
    """Turn every layer of ``model`` into its Packed-Ensembles version, in place.

    ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` become :class:`PackedLinear`/
    :class:`PackedConv1d`/:class:`PackedConv2d` (the first parameter-owning layer takes the
    shared input, the last gives the ``M`` members' outputs side by side on dimension 1), and
    BatchNorm layers get ``alpha`` times their features (per channel, so members stay
    independent). Any other layer with parameters (LayerNorm, GroupNorm, attention, ...) would
    mix the members and is an error. Weights are initialized afresh. Wrap the result in
    :class:`MemberOutputs`.

    The members stay independent as long as the network keeps the channel blocks in place:
    elementwise operations, pooling, residual additions and flattening do; a ``torch.cat`` of
    feature maps along the channels (DenseNet, U-Net skips) or a layer called on inputs of
    different widths does not, and is not detected.
    """
    positive_int(num_members, "num_members")
    positive_int(alpha, "alpha")
    positive_int(gamma, "gamma")
    layers = parameter_layers(model)
    if not layers:
        raise ValueError("to_packed_ensemble: the model has no layers with parameters")
    for name, module in layers:
        if type(module) not in (nn.Linear, *_CONVS, *_NORMS):
            raise ValueError(
                f"to_packed_ensemble: layer {name!r} is a {type(module).__name__}, which would "
                f"mix the members; supported: nn.Linear, nn.Conv1d, nn.Conv2d, nn.BatchNorm1d, "
                f"nn.BatchNorm2d"
            )
        _check_conv(name, module, "to_packed_ensemble")
    first = next(n for n, m in layers if not isinstance(m, _NORMS))
    last = [n for n, m in layers if not isinstance(m, _NORMS)][-1]
    if isinstance(layers[-1][1], _NORMS):
        raise ValueError(
            f"to_packed_ensemble: the last layer with parameters, {layers[-1][0]!r}, is a "
            f"BatchNorm; the network must end in a Linear or convolution"
        )
    replacements: dict[int, nn.Module] = {}
    for name, old in layers:
        flags = {"first": name == first, "last": name == last}
        if isinstance(old, _NORMS):
            new = type(old)(
                old.num_features * alpha,
                eps=old.eps,
                momentum=old.momentum,
                affine=old.affine,
                track_running_stats=old.track_running_stats,
            )
        elif isinstance(old, nn.Linear):
            new = PackedLinear(
                old.in_features,
                old.out_features,
                num_members,
                alpha,
                gamma,
                bias=old.bias is not None,
                **flags,
            )
        else:
            cls = PackedConv1d if isinstance(old, nn.Conv1d) else PackedConv2d
            new = cls(
                old.in_channels,
                old.out_channels,
                old.kernel_size,
                num_members,
                alpha,
                gamma,
                stride=old.stride,
                padding=old.padding,
                dilation=old.dilation,
                bias=old.bias is not None,
                **flags,
            )
        reference = next(old.parameters())
        replacements[id(old)] = new.to(device=reference.device, dtype=reference.dtype)
    return _replace(model, replacements)


class MemberOutputs(nn.Module):
    """A network whose output holds ``M`` members side by side on dimension 1 (``[B, M * C,
    ...]``, member-major), as a member dimension: ``[M, B, C, ...]``.

    Args:
        model: the network (a packed ensemble, or the converted network of :class:`MIMOEnsemble`).
        num_members: ``M``.
    """

    def __init__(self, model: nn.Module, num_members: int) -> None:
        super().__init__()
        self.model = model
        self.num_members = positive_int(num_members, "num_members")

    def split(self, out: Tensor) -> Tensor:
        if out.ndim < 2 or out.shape[1] % self.num_members:
            raise ValueError(
                f"the network's output {tuple(out.shape)} does not hold {self.num_members} "
                f"members side by side on dimension 1"
            )
        return out.unflatten(1, (self.num_members, -1)).movedim(1, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.split(self.model(x))


# -- MIMO -------------------------------------------------------------------------------------------
def to_mimo(model: nn.Module, num_members: int) -> nn.Module:
    """Widen the first parameter-owning layer of ``model`` to ``M`` times its inputs and the
    last to ``M`` times its outputs, in place (both re-initialized); the rest is shared.

    Both must be ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (one layer may be both). The
    inputs of the ``M`` members are then concatenated on dimension 1 (features or channels),
    and the output holds their outputs side by side on dimension 1: use :class:`MIMOEnsemble`.
    """
    positive_int(num_members, "num_members")
    layers = parameter_layers(model)
    if not layers:
        raise ValueError("to_mimo: the model has no layers with parameters")
    (first_name, first), (last_name, last) = layers[0], layers[-1]
    for name, module, role in ((first_name, first, "first"), (last_name, last, "last")):
        if type(module) not in (nn.Linear, *_CONVS):
            raise ValueError(
                f"to_mimo: the {role} layer with parameters, {name!r}, is a "
                f"{type(module).__name__}; MIMO widens the first and the last layer, which must "
                f"be nn.Linear, nn.Conv1d or nn.Conv2d"
            )
        _check_conv(name, module, "to_mimo")

    def widened(old: nn.Module, inputs: int, outputs: int) -> nn.Module:
        if isinstance(old, nn.Linear):
            new = nn.Linear(
                old.in_features * inputs, old.out_features * outputs, bias=old.bias is not None
            )
        else:
            new = type(old)(
                old.in_channels * inputs,
                old.out_channels * outputs,
                old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                dilation=old.dilation,
                bias=old.bias is not None,
            )
        return new.to(device=old.weight.device, dtype=old.weight.dtype)

    m = num_members
    if first is last:
        replacements = {id(first): widened(first, m, m)}
    else:
        replacements = {id(first): widened(first, m, 1), id(last): widened(last, 1, m)}
    return _replace(model, replacements)


class MIMOEnsemble(MemberOutputs):
    """A MIMO network (:func:`to_mimo`): ``M`` inputs in, ``M`` outputs out, in one forward.

    ``forward(x)`` gives every member the same input ``x`` ``[B, ...]`` (prediction);
    ``forward_members(xs)`` gives member ``m`` its own input ``xs[m]`` (``[M, B, ...]``, training
    with independent examples per member). Inputs are concatenated on the axis the first layer
    reads (the features, last, of ``[B, F]`` or ``[B, L, F]`` for a Linear; the channels of
    ``[B, C, H, W]`` for a convolution); both return ``[M, B, ...]``.
    """

    def __init__(self, model: nn.Module, num_members: int) -> None:
        super().__init__(model, num_members)
        # the axis the widened first layer reads: a Linear's features are the last dimension
        # (also of a sequence [B, L, F]), a convolution's channels dimension 1
        first = parameter_layers(model)[0][1]
        self.input_dim = -1 if isinstance(first, nn.Linear) else 1

    def forward_members(self, xs: Tensor) -> Tensor:
        if xs.shape[0] != self.num_members:
            raise ValueError(
                f"forward_members takes one input per member, [M, B, ...] with M="
                f"{self.num_members}; got {tuple(xs.shape)}"
            )
        if self.input_dim == 1:
            return self.split(self.model(xs.movedim(0, 1).flatten(1, 2)))
        return self.split(self.model(xs.movedim(0, -2).flatten(-2, -1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_members(x.unsqueeze(0).expand(self.num_members, *x.shape))
