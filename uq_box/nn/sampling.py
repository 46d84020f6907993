"""Monte Carlo samples of the weights as a tensor dimension.

Inside :func:`mc_sampling`, every Bayesian layer draws ``S`` weight samples at once and works on a
*folded* batch: a tensor ``[S * N, ...]`` whose leading dimension is sample-major. The first
Bayesian layer a forward pass meets receives the plain ``[N, ...]`` batch and folds it, so the
deterministic layers before it run once, not ``S`` times; every later layer sees the folded batch
and deterministic layers in between process all samples in one call. :func:`sample_forward`
unfolds the network output into ``[S, N, ...]``.

Outside the context, Bayesian layers behave as drop-in ``torch.nn`` layers: one weight sample per
call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor, nn

NoiseFn = Callable[[nn.Module, str, tuple[int, ...]], Tensor]
"""``noise_fn(module, name, shape)`` returns standard normal noise of ``shape`` for ``module``'s
``name`` ("weight", "bias" or "output"), e.g. to replay the same noise in a reference loop."""


@dataclass
class MCState:
    """State of one vectorized Monte Carlo forward pass."""

    num_samples: int
    noise_fn: NoiseFn | None = None
    folded: bool = False

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


_STATE: ContextVar[MCState | None] = ContextVar("uq_box_mc_state", default=None)


def current_mc_state() -> MCState | None:
    """The active :class:`MCState`, or ``None`` outside :func:`mc_sampling`."""
    return _STATE.get()


@contextmanager
def mc_sampling(num_samples: int, noise_fn: NoiseFn | None = None) -> Iterator[MCState]:
    """Run the forward passes inside with ``num_samples`` weight samples as a batch dimension."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"`num_samples` must be a positive integer, got {num_samples!r}")
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
        model: any module; its Bayesian layers sample ``num_samples`` weights at once.
        x: inputs ``[N, ...]``.
        num_samples: ``S``.
        noise_fn: optional source of the standard normal noise (see :data:`NoiseFn`).

    Returns:
        Outputs ``[S, N, ...]``. A model without Bayesian layers gives ``S`` views of one output.
    """
    with mc_sampling(num_samples, noise_fn) as state:
        out = model(x)
    if state.folded:
        return out.reshape(num_samples, -1, *out.shape[1:])
    return out.unsqueeze(0).expand(num_samples, *out.shape)
