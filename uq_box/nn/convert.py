"""Turn chosen layers of any network into Bayesian layers, in place.

``stochastic_module_names`` picks the layers (see "Partially stochastic networks" in
[docs/architecture.md](../architecture.md#partially-stochastic-networks)): ints index the
parameter-owning layers in ``model.named_modules()`` order (``-1`` is the last), strings are dotted
module names, ``None`` means every supported layer. Anything that cannot be converted is an error,
never skipped.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributions import Distribution

from uq_box.nn.layers import (
    BayesianConv1d,
    BayesianConv2d,
    BayesianConv3d,
    BayesianConvTranspose1d,
    BayesianConvTranspose2d,
    BayesianConvTranspose3d,
    BayesianLinear,
    _BayesianLayer,
)
from uq_box.nn.sampling import SamplingModule

CONVERSIONS: dict[type[nn.Module], type[_BayesianLayer]] = {
    nn.Linear: BayesianLinear,
    nn.Conv1d: BayesianConv1d,
    nn.Conv2d: BayesianConv2d,
    nn.Conv3d: BayesianConv3d,
    nn.ConvTranspose1d: BayesianConvTranspose1d,
    nn.ConvTranspose2d: BayesianConvTranspose2d,
    nn.ConvTranspose3d: BayesianConvTranspose3d,
}
"""Layer types that can become Bayesian (exact types: a subclass may change ``forward``)."""

REFUSALS: dict[type[nn.Module], str] = {
    nn.MultiheadAttention: (
        "nn.MultiheadAttention passes its projection weights straight to "
        "F.multi_head_attention_forward, so they cannot be replaced by sampled ones; make the "
        "feed-forward Linear layers of the block (e.g. 'linear1', 'linear2') or the head Bayesian"
    ),
    nn.modules.linear.NonDynamicallyQuantizableLinear: (
        "it is the output projection of an nn.MultiheadAttention, whose weight the attention "
        "reads directly; make the feed-forward Linear layers of the block or the head Bayesian"
    ),
    nn.RNNBase: (
        "recurrent layers (nn.LSTM, nn.GRU, nn.RNN) are not supported: their weights go to a "
        "fused kernel and their batch may sit in dimension 1; make the Linear layers after the "
        "recurrent one Bayesian (or use MC dropout / deep ensembles for the whole network)"
    ),
}
"""Layer types that are refused with the reason (matched with ``isinstance``)."""

StochasticModuleNames = Sequence[int] | Sequence[str] | None


def parameter_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every module owning parameters directly, in definition order."""
    seen: set[int] = set()
    layers = []
    for name, module in model.named_modules():
        if id(module) in seen or next(module.parameters(recurse=False), None) is None:
            continue
        seen.add(id(module))
        layers.append((name, module))
    return layers


def _supported_names() -> str:
    return ", ".join(f"nn.{t.__name__}" for t in CONVERSIONS)


def resolve_module_names(
    model: nn.Module, stochastic_module_names: Sequence[int] | Sequence[str]
) -> list[str]:
    """Dotted names of the modules a (non-``None``) ``stochastic_module_names`` list picks.

    Ints index :func:`parameter_layers` (``-1`` is the last), strings must name modules that own
    parameters. Shared by every method that takes ``stochastic_module_names``; each then checks
    what it can do with the modules (e.g. which types it converts).
    """
    if isinstance(stochastic_module_names, int | str) or not isinstance(
        stochastic_module_names, Sequence
    ):
        raise TypeError(
            f"`stochastic_module_names` must be a list of ints or a list of strings (or None), "
            f"got {stochastic_module_names!r}"
        )
    entries = list(stochastic_module_names)
    if not entries:
        raise ValueError(
            "`stochastic_module_names` is empty; name at least one layer, or pass None"
        )
    entries = [
        int(e) if isinstance(e, numbers.Integral) and not isinstance(e, bool) else e
        for e in entries
    ]
    kinds = {bool if isinstance(e, bool) else type(e) for e in entries}
    if not kinds <= {int} and not kinds <= {str}:
        raise TypeError(
            f"`stochastic_module_names` must be all ints (layer indices) or all strings (module "
            f"names), got {entries!r}"
        )
    layers = parameter_layers(model)
    layer_names = [name for name, _ in layers]
    if kinds == {int}:
        n = len(layers)
        bad = [i for i in entries if not -n <= i < n]
        if bad:
            raise ValueError(
                f"`stochastic_module_names` index {bad[0]} is out of range: the model has {n} "
                f"parameter-owning layers (valid indices {-n}..{n - 1}): {layer_names}"
            )
        return list(dict.fromkeys(layer_names[i] for i in entries))
    modules = dict(model.named_modules())
    unknown = [name for name in entries if name not in modules]
    if unknown:
        raise ValueError(
            f"`stochastic_module_names` names no layer {unknown[0]!r}; parameter-owning layers "
            f"are {layer_names}"
        )
    empty = [name for name in entries if next(modules[name].parameters(), None) is None]
    if empty:
        raise ValueError(
            f"`stochastic_module_names`: layer {empty[0]!r} ({type(modules[empty[0]]).__name__}) "
            f"has no parameters; parameter-owning layers are {layer_names}"
        )
    return list(dict.fromkeys(entries))


def select_modules(model: nn.Module, stochastic_module_names: StochasticModuleNames) -> list[str]:
    """Dotted names of the layers ``stochastic_module_names`` picks; a clear error otherwise."""
    layers = parameter_layers(model)
    if stochastic_module_names is None:
        chosen = [name for name, module in layers if type(module) in CONVERSIONS]
        skipped = [
            f"{name} ({type(m).__name__})"
            for name, m in layers
            if type(m) not in CONVERSIONS and not isinstance(m, _BayesianLayer)
        ]
        if not chosen:
            raise ValueError(
                f"`stochastic_module_names=None` asks for every supported layer, but the model has "
                f"none; supported: {_supported_names()}"
            )
        if skipped:
            warnings.warn(
                f"`stochastic_module_names=None`: these layers stay deterministic (unsupported "
                f"type): {', '.join(skipped)}",
                stacklevel=3,
            )
        return chosen
    names = resolve_module_names(model, stochastic_module_names)
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if isinstance(module, _BayesianLayer):
            raise ValueError(f"`stochastic_module_names`: layer {name!r} is Bayesian already")
        reason = next((r for t, r in REFUSALS.items() if isinstance(module, t)), None)
        if reason is not None and type(module) not in CONVERSIONS:
            raise ValueError(
                f"`stochastic_module_names`: layer {name!r} ({type(module).__name__}) cannot be "
                f"made Bayesian: {reason}"
            )
        if type(module) not in CONVERSIONS:
            raise ValueError(
                f"`stochastic_module_names`: layer {name!r} is a {type(module).__name__}, which "
                f"cannot be made Bayesian; supported: {_supported_names()}"
            )
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise ValueError(
                f"`stochastic_module_names`: layer {name!r} uses padding_mode="
                f"{module.padding_mode!r}; only 'zeros' is supported"
            )
    return list(dict.fromkeys(names))


def to_bayesian(
    model: nn.Module,
    stochastic_module_names: StochasticModuleNames = None,
    prior: Distribution | float | None = None,
    posterior_rho_init: float = -5.0,
    estimator: str = "reparameterization",
    keep_weights: bool = True,
    num_kl_samples: int = 1,
) -> nn.Module:
    """Replace the chosen ``nn.Linear``/``nn.Conv*d``/``nn.ConvTranspose*d`` layers by mean-field
    Gaussian ones, in place.

    All choices are checked before anything changes, so an error leaves ``model`` as it was. A
    layer used in several places becomes one Bayesian layer used in the same places.

    Args:
        model: the network; modified in place and returned.
        stochastic_module_names: which layers (see the module docstring).
        prior: prior of the new layers (default ``Normal(0, 1)``).
        posterior_rho_init: initial ``rho`` of the posterior, ``sigma = softplus(rho)``.
        estimator: ``"reparameterization"``, ``"local"`` or ``"flipout"``.
        keep_weights: use the layers' current weights as posterior means (else re-initialize).
        num_kl_samples: Monte Carlo samples of the KL where no closed form exists.

    Returns:
        ``model`` (or the new layer, when ``model`` is itself a single layer).
    """
    names = select_modules(model, stochastic_module_names)
    modules = dict(model.named_modules())
    replacements = {
        id(modules[name]): _convert_layer(
            modules[name], prior, posterior_rho_init, estimator, keep_weights, num_kl_samples
        )
        for name in names
    }
    if id(model) in replacements:  # the model is itself a single layer
        return replacements[id(model)]
    # swap every reference, so a layer used in several places stays one (Bayesian) layer
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):  # named_children skips repeats
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    disable_native_fast_paths(model)
    return model


def disable_native_fast_paths(
    model: nn.Module, kinds: tuple[type[nn.Module], ...] = (SamplingModule,)
) -> None:
    """Keep transformer blocks that hold sampling layers (Bayesian, MC dropout; or any layer of
    ``kinds``, e.g. the ensemble layers of :mod:`uq_box.nn.efficient`) on their Python path.

    In eval mode without gradients, ``nn.TransformerEncoderLayer`` (and ``nn.TransformerEncoder``
    with a padding mask) run one fused kernel that reads ``linear1.weight`` and friends directly
    and skips dropout, which would skip the sampled weights and masks. The layers' own switches turn it off: the encoder
    layer's ``activation_relu_or_gelu`` flag (read only by the fast-path checks; the Python path
    calls ``activation`` itself) and the encoder's ``use_nested_tensor``.
    """
    for module in model.modules():
        holds = any(isinstance(m, kinds) for m in module.modules())
        if isinstance(module, nn.TransformerEncoderLayer) and holds:
            module.activation_relu_or_gelu = 0
        elif isinstance(module, nn.TransformerEncoder) and holds:
            module.use_nested_tensor = False


def _convert_layer(
    old: nn.Module,
    prior: Distribution | float | None,
    posterior_rho_init: float,
    estimator: str,
    keep_weights: bool,
    num_kl_samples: int,
) -> _BayesianLayer:
    if isinstance(old, nn.Linear):
        layer_args = dict(in_features=old.in_features, out_features=old.out_features)
    else:
        names = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation")
        layer_args = {name: getattr(old, name) for name in (*names, "groups")}
        if isinstance(old, nn.modules.conv._ConvTransposeNd):
            layer_args["output_padding"] = old.output_padding
    new = CONVERSIONS[type(old)](
        **layer_args,
        bias=old.bias is not None,
        prior=prior,
        posterior_rho_init=posterior_rho_init,
        estimator=estimator,
        num_kl_samples=num_kl_samples,
    )
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    if keep_weights:
        with torch.no_grad():
            new.weight_mu.copy_(old.weight)
            if old.bias is not None:
                new.bias_mu.copy_(old.bias)
    return new
