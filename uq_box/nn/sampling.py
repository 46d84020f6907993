"""Monte Carlo samples of the weights as a tensor dimension, on any network graph.

Inside :func:`mc_sampling`, every sampling layer (Bayesian layers, :class:`~uq_box.nn.MCDropout`)
draws ``S`` samples at once and works on a *folded* batch: a tensor ``[S * N, ...]`` whose leading
dimension is sample-major (row ``s * N + n``). :func:`sample_forward` runs a network that way and
unfolds its output into ``[S, N, ...]``; the result equals ``S`` single forward passes given the
same noise (``noise_fn``), on any graph: skip connections, concatenations, parallel branches, a
layer called twice, transformer blocks.

How (:mod:`uq_box.nn.graph`): the network is traced once with ``torch.fx`` (per module and
train/eval mode). Operations that depend on no sampling layer run once on the plain ``[N, ...]``
batch; where such a tensor meets a folded one (a residual ``+``, a ``torch.cat``), it is folded
first, so every operation downstream of a sampling layer sees ``S`` copies. A forward that cannot
be traced (data-dependent control flow, ...) falls back to folding the input, so every layer runs
on ``[S * N, ...]``: correct, slower, and said once in a warning. BatchNorm layers in training mode
that see a folded batch normalize each sample with its own batch statistics, as ``S`` separate
forward passes would, and update their running statistics once with the mean of the ``S``
samples' statistics (one update per optimizer step, as for the deterministic layers).

Two assumptions, checked where they can be: dimension 0 is the batch (a layer that takes the
batch in dimension 1, ``batch_first=False``, is refused), and the layers downstream of a sampling
layer treat the rows of a batch independently (BatchNorm is made to).

Outside the context, sampling layers behave as drop-in ``torch.nn`` layers: one sample per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from uq_box.checks import positive_int

NoiseFn = Callable[[nn.Module, str, tuple[int, ...]], Tensor]
"""``noise_fn(module, name, shape)`` returns standard normal noise of ``shape`` for ``module``'s
``name`` ("weight", "bias", "output", ...), e.g. to replay the same noise in a reference loop."""


class SamplingModule(nn.Module):
    """Marker base of the layers that draw Monte Carlo samples inside :func:`mc_sampling`.

    Such a layer reads :attr:`MCState.input_folded` to tell whether its input is the plain batch
    ``[N, ...]`` or the folded ``[S * N, ...]``, and always returns a folded output.
    """


@dataclass
class MCState:
    """State of one vectorized Monte Carlo forward pass.

    Attributes:
        num_samples: ``S``.
        noise_fn: optional source of the noise (see :data:`NoiseFn`).
        input_folded: whether the sampling layer being called gets a folded input (set by the
            traced graph around the calls whose input is the plain batch).
    """

    num_samples: int
    noise_fn: NoiseFn | None = None
    input_folded: bool = True
    _drawn: dict = field(default_factory=dict, repr=False)

    def noise(self, module: nn.Module, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Standard normal noise for ``module``'s ``name``, of ``shape``, on ``like``'s device."""
        if self.noise_fn is None:
            return torch.randn(shape, dtype=like.dtype, device=like.device)
        eps = self.noise_fn(module, name, shape)
        if tuple(eps.shape) != tuple(shape):
            raise ValueError(
                f"`noise_fn` returned shape {tuple(eps.shape)} for {name}; expected {tuple(shape)}"
            )
        return eps.to(dtype=like.dtype, device=like.device)

    def weight_noise(
        self, module: nn.Module, name: str, shape: tuple[int, ...], like: Tensor
    ) -> Tensor:
        """Like :meth:`noise`, drawn once per pass: a layer called twice in one forward pass
        uses the same ``S`` weight samples in both places (its weights are tied).
        """
        key = (id(module), name)
        eps = self._drawn.get(key)
        if eps is None:
            eps = self._drawn[key] = self.noise(module, name, shape, like)
        return eps

    def fold(self, x: Tensor) -> Tensor:
        """``S`` copies of a plain batch ``[N, ...]`` as one folded batch ``[S * N, ...]``."""
        return x.unsqueeze(0).expand(self.num_samples, *x.shape).flatten(0, 1)

    def check_folded(self, x: Tensor, module: nn.Module) -> None:
        """Fail clearly when a folded input's rows cannot be split into ``S`` samples."""
        if x.ndim == 0 or x.shape[0] % self.num_samples:
            raise ValueError(
                f"{type(module).__name__} got an input of shape {tuple(x.shape)} inside "
                f"mc_sampling({self.num_samples}); expected a folded batch [S * N, ...] "
                f"(dimension 0 the batch, sample-major); run the network with sample_forward"
            )


_STATE: ContextVar[MCState | None] = ContextVar("uq_box_mc_state", default=None)


def current_mc_state() -> MCState | None:
    """The active :class:`MCState`, or ``None`` outside :func:`mc_sampling`."""
    return _STATE.get()


@contextmanager
def mc_sampling(num_samples: int, noise_fn: NoiseFn | None = None) -> Iterator[MCState]:
    """Run the forward passes inside with ``num_samples`` samples as a batch dimension.

    Inputs of the sampling layers inside are folded batches ``[S * N, ...]``;
    :func:`sample_forward` takes a plain batch and does the folding where the graph needs it.
    """
    num_samples = positive_int(num_samples, "num_samples")
    state = MCState(num_samples=num_samples, noise_fn=noise_fn)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def sample_forward(
    model: nn.Module, x: Tensor, num_samples: int, noise_fn: NoiseFn | None = None
) -> Tensor:
    """``S`` Monte Carlo forward passes of ``model`` as one batched call.

    Args:
        model: any module with dimension 0 the batch; its sampling layers (Bayesian layers,
            MC dropout) draw ``num_samples`` samples at once.
        x: inputs ``[N, ...]``.
        num_samples: ``S``.
        noise_fn: optional source of the standard normal noise (see :data:`NoiseFn`).

    Returns:
        Outputs ``[S, N, ...]``, equal to ``S`` single forward passes given the same noise. A
        model without sampling layers gives ``S`` views of one output.
    """
    from uq_box.nn.graph import mc_plan

    plan = None if num_samples == 1 else mc_plan(model, x)  # S = 1: nothing to fold
    with mc_sampling(num_samples, noise_fn) as state:
        out, folded = (model(x), True) if plan is None else plan.run(model, x, state)
    if not isinstance(out, Tensor):
        raise TypeError(
            f"sample_forward needs a network that returns a tensor, got {type(out).__name__}"
        )
    batch = x.shape[0]
    if not folded:
        return out.unsqueeze(0).expand(num_samples, *out.shape)
    if out.ndim == 0 or out.shape[0] != num_samples * batch:
        raise ValueError(
            f"the network's output has shape {tuple(out.shape)}; with {num_samples} samples of "
            f"a batch of {batch} its dimension 0 must be {num_samples * batch} (batch first)"
        )
    return out.reshape(num_samples, batch, *out.shape[1:])
