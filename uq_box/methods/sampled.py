"""Base of the methods that predict with stored samples of (some of) the parameters.

SWAG draws them from a Gaussian fitted to SGD snapshots, SG-MCMC keeps the sampler's states.
Either way the ``S`` parameter vectors are stacked and run through the network as one
``torch.func.vmap`` over ``functional_call``: nothing is reloaded per call, and the model's own
parameters are never touched by prediction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from uq_box.methods.base import UQMethod, eval_mode
from uq_box.nn.convert import StochasticModuleNames, resolve_module_names
from uq_box.nn.ensemble import map_stacked


def sampled_parameter_names(
    model: nn.Module, stochastic_module_names: StochasticModuleNames
) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the parameters a method samples.

    Any layer type works: the methods only need the parameters.

    Args:
        model: the backbone.
        stochastic_module_names: ``None`` for every parameter; ints index the parameter-owning
            layers (:func:`uq_box.nn.convert.parameter_layers`, ``-1`` = last); strings are dotted
            module names (all parameters under that module).

    Returns:
        Parameter names in ``model.named_parameters()`` order, without repeats.
    """
    all_names = [name for name, _ in model.named_parameters()]
    if not all_names:
        raise ValueError("`model` has no parameters; there is nothing to sample")
    if stochastic_module_names is None:
        return all_names
    modules = dict(model.named_modules())
    chosen = [modules[name] for name in resolve_module_names(model, stochastic_module_names)]
    wanted = {id(p) for module in chosen for p in module.parameters()}
    return [name for name, p in model.named_parameters() if id(p) in wanted]


def unflatten_parameters(
    flat: Tensor, names: Sequence[str], shapes: Sequence[tuple[int, ...]]
) -> dict[str, Tensor]:
    """Split flat parameter vectors ``[..., P]`` into ``{name: [..., *shape]}`` (in order)."""
    lead = flat.shape[:-1]
    pieces = flat.split([math.prod(shape) for shape in shapes], dim=-1)
    return {
        name: piece.reshape(*lead, *shape)
        for name, piece, shape in zip(names, pieces, shapes, strict=True)
    }


class ParameterSampling(UQMethod):
    """Stored parameter samples, flattened ``[P]``, and their vectorized prediction.

    Subclasses call :meth:`select_parameters` in their constructor and implement
    :attr:`has_samples` and :meth:`sample_parameters`.
    """

    def select_parameters(self, stochastic_module_names: StochasticModuleNames) -> Tensor:
        """Pick the sampled parameters; returns the first one (for dtype and device)."""
        self.parameter_names = sampled_parameter_names(self.model, stochastic_module_names)
        params = dict(self.model.named_parameters())
        self._shapes = [tuple(params[name].shape) for name in self.parameter_names]
        self._numels = [params[name].numel() for name in self.parameter_names]
        return params[self.parameter_names[0]]

    @property
    def num_sampled_parameters(self) -> int:
        """``P``, the length of a flat parameter vector."""
        return sum(self._numels)

    @property
    def has_samples(self) -> bool:
        """Whether prediction can draw samples yet."""
        raise NotImplementedError

    def no_samples_message(self) -> str:
        """Why there is no sample yet and what to do (the error of :meth:`check_samples`)."""
        raise NotImplementedError

    def check_samples(self) -> None:
        """Fail clearly when prediction is asked for before any sample exists."""
        if not self.has_samples:
            raise RuntimeError(self.no_samples_message())

    def sample_parameters(self, num_samples: int | None) -> Tensor:
        """``S`` flat parameter vectors ``[S, P]``."""
        raise NotImplementedError

    def flat_parameters(self) -> Tensor:
        """The sampled parameters' current values as one flat vector ``[P]`` (detached)."""
        params = dict(self.model.named_parameters())
        return torch.cat([params[name].detach().reshape(-1) for name in self.parameter_names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``[..., P]`` into the sampled parameters, each ``[..., *shape]``."""
        return unflatten_parameters(flat, self.parameter_names, self._shapes)

    @property
    def in_burnin(self) -> bool:
        """Always False: these methods train on their own objective in every epoch."""
        return False

    def sample_outputs(self, x: Tensor, num_samples: int | None) -> Tensor:
        """Outputs of ``S`` parameter samples in one vectorized call: ``[S, N, ...]``.

        In training mode every sample gets its own copy of the buffers: a BatchNorm then
        normalizes with the statistics of the batch, as a training-mode forward does, and its
        in-place update of the running statistics (which under vmap cannot go into a buffer
        shared by the samples) goes to the copies; the model's own buffers are left as they
        are, as in eval mode (``predict_step``). A forward that vmap cannot vectorize runs
        sample by sample (see :func:`uq_box.nn.ensemble.map_stacked`).
        """
        stacked = self.unflatten(self.sample_parameters(num_samples))
        model = self.model
        buffers: dict[str, Tensor] = {}
        if model.training:
            count = next(iter(stacked.values())).shape[0]
            buffers = {
                name: buffer.expand(count, *buffer.shape).clone()
                for name, buffer in model.named_buffers()
            }

        def call(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            return functional_call(model, (params, buffers), (x,))

        return map_stacked(
            self,
            call,
            (stacked, buffers),
            x.device,
            restore=model.buffers(),
            what="samples",
            training=model.training,
        )

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The data loss of the network as it is."""
        outputs = self.model(x).unsqueeze(0)
        nll = self.data_loss(outputs, target)
        return {"loss": nll, "nll": nll}, outputs

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Objective and metrics; before the first sample the metrics use the plain network."""
        if self.has_samples:
            return super().validation_step(batch, batch_idx)
        x, target = self._inputs_and_targets(batch, "val")
        terms, outputs = self.loss(x, target)
        self._accumulate("val", {**terms, **self.running_terms(outputs, target)}, len(x))
        with torch.no_grad(), eval_mode(self.model):
            preds = self.predictive(self.model(x).unsqueeze(0))
        self.update_metrics(self.val_metrics, preds, target)
        return None
