"""BatchNorm layers that sample their statistics: MC BatchNorm (Teye, Azizpour & Smith 2018).

Teye et al. 2018, "Bayesian Uncertainty Estimation for Batch Normalized Deep Networks": a network
trained with BatchNorm is a Monte Carlo model whose randomness is the composition of the training
mini-batch. At prediction, each of ``S`` samples normalizes with the batch statistics (mean and
variance per channel) of one random training mini-batch instead of the running averages.

:func:`to_mc_batchnorm` turns every ``nn.BatchNorm1d/2d/3d`` of a network into an
:class:`MCBatchNorm1d`/``2d``/``3d`` in place (same parameters, buffers and module names) with room
for ``S`` sets of statistics; :func:`collect_batch_statistics` runs the network on ``S`` training
batches and stores each layer's batch mean and (biased) variance, as the layer normalized with them
in training. The layers are sampling layers (:class:`~uq_box.nn.sampling.SamplingModule`): inside
:func:`~uq_box.nn.sampling.sample_forward` the ``S`` statistics sets are the sample dimension of a
folded batch ``[S * N, ...]``, so ``S`` predictions are one batched forward pass, and the layers in
front of the first BatchNorm run once. Outside it they are plain BatchNorm layers (training mode:
batch statistics; eval mode: running statistics), so the network trains as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from uq_box.checks import positive_int
from uq_box.nn.sampling import SamplingModule, current_mc_state

__all__ = [
    "MCBatchNorm1d",
    "MCBatchNorm2d",
    "MCBatchNorm3d",
    "MCBatchNormLayer",
    "collect_batch_statistics",
    "mc_batchnorm_layers",
    "to_mc_batchnorm",
]


class MCBatchNormLayer(SamplingModule):
    """The sampling behaviour shared by :class:`MCBatchNorm1d`, ``2d`` and ``3d``.

    Buffers (in the ``state_dict``): ``sample_mean`` and ``sample_var`` ``[S, C]``, the stored
    batch statistics, and ``num_collected``, how many sets are stored (0 until
    :func:`collect_batch_statistics` ran).
    """

    sample_mean: Tensor
    sample_var: Tensor
    num_collected: Tensor
    _recorded: list[tuple[Tensor, Tensor]] | None = None

    def _init_samples(self, num_samples: int) -> None:
        channels = self.num_features
        like = self.weight if self.weight is not None else self.running_mean
        kwargs = {} if like is None else {"dtype": like.dtype, "device": like.device}
        self.register_buffer("sample_mean", torch.zeros(num_samples, channels, **kwargs))
        self.register_buffer("sample_var", torch.ones(num_samples, channels, **kwargs))
        self.register_buffer("num_collected", torch.zeros((), dtype=torch.long))

    @property
    def num_samples(self) -> int:
        """``S``: the statistics sets the layer has room for."""
        return self.sample_mean.shape[0]

    def _affine(self, normalized: Tensor, view: tuple[int, ...]) -> Tensor:
        if self.weight is not None:
            normalized = normalized * self.weight.view(view)
        if self.bias is not None:
            normalized = normalized + self.bias.view(view)
        return normalized

    def forward(self, x: Tensor) -> Tensor:
        """Plain BatchNorm outside ``mc_sampling``; the stored statistics inside it."""
        if self._recorded is not None:
            return self._record(x)
        state = current_mc_state()
        if state is None:
            return super().forward(x)
        self._check_input_dim(x)
        if state.input_folded:
            state.check_folded(x, self)
        else:
            x = state.fold(x)
        num_samples, available = state.num_samples, int(self.num_collected)
        if available == 0:
            raise RuntimeError(
                f"{type(self).__name__} has no stored batch statistics; run "
                f"uq_box.nn.mc_batchnorm.collect_batch_statistics(model, batches) first"
            )
        if num_samples > available:
            raise ValueError(
                f"{num_samples} samples asked of {type(self).__name__}, which stores "
                f"{available} sets of batch statistics"
            )
        channels, rest = x.shape[1], x.shape[2:]
        per_sample = x.reshape(num_samples, -1, channels, *rest)
        view = (num_samples, 1, channels) + (1,) * len(rest)
        mean = self.sample_mean[:num_samples].view(view)
        inv_std = torch.rsqrt(self.sample_var[:num_samples].view(view) + self.eps)
        out = self._affine((per_sample - mean) * inv_std, (1, 1, channels) + (1,) * len(rest))
        return out.reshape(x.shape)

    def _record(self, x: Tensor) -> Tensor:
        """Normalize with the batch's own statistics (as in training) and record them."""
        self._check_input_dim(x)
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
        self._recorded.append((mean.detach(), var.detach()))
        view = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        normalized = (x - mean.view(view)) * torch.rsqrt(var.view(view) + self.eps)
        return self._affine(normalized, view)


class MCBatchNorm1d(MCBatchNormLayer, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with ``S`` stored sets of batch statistics (see the module docstring)."""


class MCBatchNorm2d(MCBatchNormLayer, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with ``S`` stored sets of batch statistics (see the module docstring)."""


class MCBatchNorm3d(MCBatchNormLayer, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with ``S`` stored sets of batch statistics (see the module docstring)."""


#: The BatchNorm types :func:`to_mc_batchnorm` converts, and what each becomes.
CONVERSIONS: dict[type[nn.Module], type[MCBatchNormLayer]] = {
    nn.BatchNorm1d: MCBatchNorm1d,
    nn.BatchNorm2d: MCBatchNorm2d,
    nn.BatchNorm3d: MCBatchNorm3d,
}


def mc_batchnorm_layers(model: nn.Module) -> list[MCBatchNormLayer]:
    """The MC BatchNorm layers of ``model``, in definition order."""
    return [m for m in model.modules() if isinstance(m, MCBatchNormLayer)]


def to_mc_batchnorm(model: nn.Module, num_samples: int) -> nn.Module:
    """Make every BatchNorm layer of ``model`` an MC BatchNorm layer with room for ``S`` sets.

    In place: each ``nn.BatchNorm1d/2d/3d`` keeps its parameters, buffers and name and gains the
    buffers ``sample_mean``, ``sample_var`` ``[S, C]`` and ``num_collected`` (already converted
    layers are reset to ``S`` empty sets).

    Args:
        model: a network with BatchNorm layers.
        num_samples: ``S``, the sets of batch statistics to store.

    Returns:
        ``model``.

    Raises:
        ValueError: if ``model`` has no BatchNorm layer, or one of another type (``SyncBatchNorm``,
            a lazy layer) that cannot be converted.
    """
    positive_int(num_samples, "num_mc_samples_test")
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    norms = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    if not norms:
        raise ValueError(
            f"`model` ({type(model).__name__}) has no BatchNorm layer; MC BatchNorm samples the "
            f"batch statistics of nn.BatchNorm1d/2d/3d layers (e.g. uq_box.models.MLP(..., "
            f"batch_norm=True)); use another method for a network without BatchNorm"
        )
    for name, module in norms:
        if isinstance(module, MCBatchNormLayer):
            module._init_samples(num_samples)
            continue
        target = CONVERSIONS.get(type(module))
        if target is None:
            raise ValueError(
                f"`model` has a {type(module).__name__} at {name!r}, which MC BatchNorm cannot "
                f"convert; supported: {[t.__name__ for t in CONVERSIONS]}"
            )
        module.__class__ = target
        module._init_samples(num_samples)
    return model


@contextmanager
def _recording(layers: list[MCBatchNormLayer]) -> Iterator[None]:
    for layer in layers:
        layer._recorded = []
    try:
        yield
    finally:
        for layer in layers:
            layer._recorded = None


def collect_batch_statistics(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Store the batch statistics of ``S`` training batches in every MC BatchNorm layer.

    Each batch runs through the network in eval mode (dropout off) with the MC BatchNorm layers
    normalizing by that batch's own mean and biased variance, as in a training step (their
    running statistics stay as they are); those statistics become one stored set. One forward
    pass per batch: a one-off pass over ``S`` batches, like part of a training epoch (the
    prediction afterwards is one batched call for all ``S``).

    Args:
        model: a network converted by :func:`to_mc_batchnorm`.
        batches: input tensors ``[B, ...]``, at most ``S`` are used (random training mini-batches
            of the training batch size, as Teye et al. draw them).

    Returns:
        The number of sets stored (the first ones; fewer than ``S`` if ``batches`` ran out).

    Raises:
        ValueError: if ``model`` has no MC BatchNorm layer or ``batches`` is empty.
    """
    layers = mc_batchnorm_layers(model)
    if not layers:
        raise ValueError("`model` has no MC BatchNorm layer; convert it with to_mc_batchnorm")
    num_samples = layers[0].num_samples
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    count = 0
    try:
        with torch.no_grad(), _recording(layers):
            for x in batches:
                if count == num_samples:
                    break
                model(x)
                for layer in layers:
                    if not layer._recorded:
                        raise ValueError(
                            f"a {type(layer).__name__} of `model` was not called in its forward "
                            f"pass; MC BatchNorm needs every BatchNorm layer on the input's path"
                        )
                    mean, var = layer._recorded[0]  # (a layer called twice: its first call)
                    layer.sample_mean[count].copy_(mean)
                    layer.sample_var[count].copy_(var)
                    layer._recorded.clear()
                count += 1
    finally:
        for m, training in modes:
            m.training = training
    if count == 0:
        raise ValueError("`batches` gave no batch; MC BatchNorm needs training batches")
    for layer in layers:
        layer.num_collected.fill_(count)
    return count
