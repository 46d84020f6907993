"""Soft spectral normalization of chosen layers of any network, in place.

The chosen ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers get a parametrization (``torch.nn.utils.
parametrize``) that divides the weight by ``max(1, sigma / c)``, with ``sigma`` the largest
singular value of the weight (estimated by power iteration) and ``c`` the ``coefficient``: the
*soft* spectral normalization of Behrmann et al. 2019 ("Invertible Residual Networks") used by
SNGP (Liu et al. 2020, "Simple and Principled Uncertainty Estimation with Deterministic Deep
Learning via Distance Awareness") and DDU (Mukhoti et al. 2023). A layer whose norm is already
below ``c`` is left as it is; a larger one is scaled down to norm ``c``, so each layer is at most
``c``-Lipschitz.

**Power iteration.** As in ``torch.nn.utils.parametrizations.spectral_norm``: the left and right
singular vector estimates ``u`` and ``v`` are registered buffers (they follow the device and the
dtype, and checkpoints carry them); every forward in training mode runs ``n_power_iterations``
steps of power iteration on the current weight (without gradient) and
``sigma = u^T W v`` (with gradient); in eval mode the stored vectors are used as they are. 15
iterations at construction start the estimate near the true value.

**Convolutions** are normalized on the weight reshaped to a matrix ``[out_channels, in_channels
* prod(kernel)]``, as torch's ``spectral_norm`` does, *not* with the power iteration of
Behrmann et al. on the convolution operator itself (which needs the input's spatial shape). The
reshaped-kernel norm is an approximation: the convolution's operator norm (stride 1) can exceed
it by up to a factor ``sqrt(prod(kernel))``, so a normalized convolution is
``c * sqrt(prod(kernel))``-Lipschitz at worst, not ``c``.

Layers are chosen like ``stochastic_module_names`` (see
[docs/architecture.md](../architecture.md#partially-stochastic-networks)): ints index the
parameter-owning layers, strings are dotted module names, ``None`` means every supported layer.
An unknown name, a layer of another type or a layer normalized twice is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.functional import normalize
from torch.nn.utils import parametrize

from uq_box.checks import positive_finite, positive_int
from uq_box.nn.convert import parameter_layers, resolve_module_names

__all__ = [
    "SPECTRAL_TYPES",
    "SoftSpectralNorm",
    "is_spectral_normalized",
    "resolve_layer_names",
    "spectral_norm_of",
    "spectral_normalize",
]

#: Layer types spectral normalization applies to (exact types).
SPECTRAL_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Power iterations at construction.
_INITIAL_ITERATIONS = 15


def _normalize(x: Tensor, eps: float) -> Tensor:
    return normalize(x, dim=0, eps=eps)


class SoftSpectralNorm(nn.Module):
    """The parametrization ``W -> W / max(1, sigma(W) / coefficient)``.

    Args:
        weight: the layer's weight (its shape and dtype size the singular vectors).
        coefficient: the bound ``c`` on the layer's spectral norm.
        n_power_iterations: power iteration steps per training forward.
        eps: guards the normalization of the singular vectors.
    """

    def __init__(
        self,
        weight: Tensor,
        coefficient: float = 0.95,
        n_power_iterations: int = 1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        self.coefficient = positive_finite(coefficient, "coefficient")
        self.n_power_iterations = positive_int(n_power_iterations, "n_power_iterations")
        self.eps = eps
        matrix = weight.detach().flatten(1)
        u = _normalize(matrix.new_empty(matrix.shape[0]).normal_(0, 1), eps)
        v = _normalize(matrix.new_empty(matrix.shape[1]).normal_(0, 1), eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        self._power_iteration(matrix, _INITIAL_ITERATIONS)

    @torch.no_grad()
    def _power_iteration(self, matrix: Tensor, iterations: int) -> None:
        for _ in range(iterations):
            self._u.copy_(_normalize(matrix @ self._v, self.eps))
            self._v.copy_(_normalize(matrix.T @ self._u, self.eps))

    def sigma(self, weight: Tensor) -> Tensor:
        """The estimate ``u^T W v`` of the largest singular value (with gradient)."""
        matrix = weight.flatten(1)
        # clones: a later forward updates the buffers in place, autograd keeps these
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return torch.dot(u, matrix @ v)

    def forward(self, weight: Tensor) -> Tensor:
        """The normalized weight (one power iteration step per call in training mode)."""
        if self.training:
            self._power_iteration(weight.detach().flatten(1), self.n_power_iterations)
        factor = torch.clamp(self.sigma(weight) / self.coefficient, min=1.0)
        return weight / factor

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient}, n_power_iterations={self.n_power_iterations}"


def is_spectral_normalized(module: nn.Module) -> bool:
    """Whether ``module``'s weight carries a :class:`SoftSpectralNorm`."""
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, SoftSpectralNorm) for p in module.parametrizations.weight
    )


def spectral_norm_of(module: nn.Module) -> Tensor:
    """The largest singular value of ``module``'s (effective) weight matrix, exactly (SVD)."""
    with torch.no_grad():
        return torch.linalg.matrix_norm(module.weight.detach().flatten(1).double(), ord=2)


def resolve_layer_names(
    model: nn.Module, names: Sequence[int] | Sequence[str], argument: str
) -> list[str]:
    """:func:`~uq_box.nn.convert.resolve_module_names` with its messages naming ``argument``."""
    try:
        return resolve_module_names(model, names)
    except (TypeError, ValueError) as error:
        message = str(error).replace("`stochastic_module_names`", f"`{argument}`")
        raise type(error)(message) from None


def spectral_normalize(
    model: nn.Module,
    module_names: Sequence[int] | Sequence[str] | None = None,
    coefficient: float = 0.95,
    n_power_iterations: int = 1,
) -> list[str]:
    """Soft spectral normalization of the chosen layers of ``model``, in place.

    Args:
        model: any network.
        module_names: the layers, as ``stochastic_module_names`` chooses them: ints index the
            parameter-owning layers (``-1`` is the last), strings are dotted module names;
            ``None``: every ``nn.Linear`` and ``nn.Conv1d/2d/3d``.
        coefficient: the bound ``c > 0`` on each layer's spectral norm (Liu et al. 2020 use
            values around 1, e.g. 0.95; DDU 3).
        n_power_iterations: power iteration steps per training forward.

    Returns:
        The dotted names of the normalized layers.

    Raises:
        ValueError: an unknown name or index, a layer of an unsupported type, a layer that is
            already normalized, or ``None`` on a network without a supported layer.
    """
    positive_finite(coefficient, "coefficient")
    positive_int(n_power_iterations, "n_power_iterations")
    supported = ", ".join(f"nn.{t.__name__}" for t in SPECTRAL_TYPES)
    if module_names is None:
        names = [n for n, m in model.named_modules() if type(m) in SPECTRAL_TYPES]
        if not names:
            found = [f"{n} ({type(m).__name__})" for n, m in parameter_layers(model)]
            raise ValueError(
                f"`module_names=None` asks for every layer spectral normalization supports "
                f"({supported}), but the model has none; its parameter-owning layers are {found}"
            )
    else:
        names = resolve_layer_names(model, module_names, "module_names")
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if is_spectral_normalized(module):
            raise ValueError(f"`module_names`: layer {name!r} is already spectral-normalized")
        if type(module) not in SPECTRAL_TYPES:
            raise ValueError(
                f"`module_names`: layer {name!r} ({type(module).__name__}) cannot be "
                f"spectral-normalized; supported layers: {supported}"
            )
    for name in names:
        module = modules[name]
        parametrize.register_parametrization(
            module, "weight", SoftSpectralNorm(module.weight, coefficient, n_power_iterations)
        )
    return names
