"""Where a network's Monte Carlo samples are folded: a ``torch.fx`` plan per network and mode.

:func:`mc_plan` traces a network once (per module structure and train/eval mode) with the
sampling layers (:class:`~uq_box.nn.sampling.SamplingModule`) and ``torch.nn``'s own layers as
leaves, marks every node that depends on a sampling layer, and rewrites the graph so that

- nodes that depend on no sampling layer run once, on the plain batch ``[N, ...]``;
- a plain batch tensor that meets a folded one (a residual ``+``, a ``torch.cat``, the input of a
  ``torch.nn`` block holding a Bayesian layer) is folded there, once;
- a sampling layer whose input is plain gets it unfolded (it folds cheaply itself, e.g. the local
  reparameterization computes the mean and variance once).

Before a plan is used it is checked on the first batch: the traced graph must compute what the
network computes (same random draws, same outputs), and every plain value that crosses into the
folded part must either carry the batch in dimension 0 (it is folded) or not depend on the batch
at all (a parameter, a constant, a shape other than the batch size). A batch-dependent number such
as ``x.size(0)`` taken before the first sampling layer and used after it, a trace that fails, or a
trace that computes something else all fall back to folding the input (every layer on
``[S * N, ...]``), with one warning saying why. Never a silently wrong result.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from uq_box.nn.sampling import MCState, SamplingModule, current_mc_state

_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, MCPlan]] = weakref.WeakKeyDictionary()


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _holds_sampling(module: nn.Module) -> bool:
    return any(isinstance(m, SamplingModule) for m in module.modules())


def fold_plain(value: Any) -> Any:
    """Fold a plain batch tensor ``[N, ...]`` into ``[S * N, ...]`` (graph node; identity
    outside :func:`~uq_box.nn.sampling.mc_sampling` and for non-tensors).
    """
    state = current_mc_state()
    if state is None or not isinstance(value, Tensor):
        return value
    return state.fold(value)


def call_unfolded(module: nn.Module, x: Tensor) -> Tensor:
    """Call a sampling layer on a plain batch ``[N, ...]`` (graph node)."""
    state = current_mc_state()
    if state is None:
        return module(x)
    state.input_folded = False
    try:
        return module(x)
    finally:
        state.input_folded = True


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer with sampling layers and ``torch.nn``'s own layers as leaves.

    A submodule with forward hooks is a leaf too, so that its hooks run as they would. A
    submodule whose ``forward`` cannot be traced (control flow on a tensor, ...) becomes a
    leaf itself, so the rest of the network keeps its fine-grained plan; if it holds a sampling
    layer, its inputs are folded (see :func:`_folded_nodes`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.opaque: set[nn.Module] = set()

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, SamplingModule)
            or m in self.opaque
            or _has_hooks(m)  # called whole, so that its hooks run
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if m is self.root or self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        stack = list(self.module_stack)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:  # noqa: BLE001 -- untraceable: keep the module whole
            for key in list(self.module_stack)[len(stack) :]:
                del self.module_stack[key]
            self.opaque.add(m)  # its half-traced nodes are dead code, removed after the trace
            return super().call_module(m, forward, args, kwargs)

    def trace(self, root: nn.Module, concrete_args: Any = None) -> fx.Graph:
        self.root = root
        return super().trace(root, concrete_args)


class MCPlan:
    """How one network runs ``S`` Monte Carlo samples: a rewritten graph, or fold at the input.

    Attributes:
        graph_module: the rewritten ``torch.fx`` graph; ``None`` runs the network itself (folded
            at the input, or, with ``output_folded=False``, once: it samples nothing).
        output_folded: whether the output is folded (else it depends on no sample).
        reason: why the plan folds at the input (``None`` otherwise).
        single_layer: the network is one sampling layer, given the plain batch.
    """

    def __init__(
        self,
        model: nn.Module,
        graph_module: fx.GraphModule | None,
        output_folded: bool = True,
        reason: str | None = None,
        single_layer: bool = False,
    ) -> None:
        self.graph_module = graph_module
        self.single_layer = single_layer
        self.output_folded = output_folded
        self.reason = reason
        self.batch_norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        # tensors the graph holds itself (get_attr): a `.to()` that replaces one invalidates it
        self._attrs = []
        if graph_module is not None:
            for node in graph_module.graph.nodes:
                if node.op == "get_attr":
                    value = _fetch(graph_module, node.target)
                    if not isinstance(value, nn.Module):
                        self._attrs.append((node.target, value))

    def valid_for(self, model: nn.Module) -> bool:
        """Whether the tensors this plan holds are still the network's."""
        return all(_fetch(model, target) is value for target, value in self._attrs)

    def run(self, model: nn.Module, x: Tensor, state: MCState) -> tuple[Any, bool]:
        """``(output, folded)`` of one vectorized forward pass inside ``mc_sampling``."""
        if self.graph_module is not None:  # its forward: the graph module has no hooks
            return self.graph_module.forward(x), self.output_folded
        if self.single_layer:
            return call_unfolded(model, x), True
        if not self.output_folded:
            return model(x), False
        with _per_sample_batch_norm(self.batch_norms):
            return model(state.fold(x)), True


def _fetch(root: nn.Module, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def mc_plan(model: nn.Module, x: Tensor) -> MCPlan:
    """The cached plan of ``model`` in its current structure and mode (built on first use)."""
    key = _structure_key(model)
    plans = _PLANS.setdefault(model, {})
    plan = plans.get(key)
    if in_functorch_transform():
        return _plan_in_transform(model, plans, key, plan)
    if plan is None or not plan.valid_for(model):
        plan = _build_plan(model, x)
        if len(plans) > 8:  # structures seen before and gone (e.g. converted layers)
            plans.clear()
        plans[key] = plan
    return plan


def _structure_key(model: nn.Module) -> tuple:
    """Every submodule's identity and mode, depth first: the cache key of a plan.

    A walk over ``_modules`` without ``named_modules``' prefix strings: it runs at every
    Monte Carlo forward pass, so it must cost little next to a small network's forward.
    """
    key: list = []
    stack = [model]
    while stack:
        module = stack.pop()
        key += (id(module), module.training)
        stack.extend(child for child in module._modules.values() if child is not None)
    return tuple(key)


def in_functorch_transform() -> bool:
    """Whether the code runs inside a ``torch.func`` transform (``vmap``, ``grad``)."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _plan_in_transform(
    model: nn.Module, plans: dict[tuple, MCPlan], key: tuple, plan: MCPlan | None
) -> MCPlan:
    """The plan inside ``torch.func.vmap`` (e.g. stacked runs), where a trace cannot be probed.

    A plan built outside the transform serves when it holds no tensor of the network (its
    parameters may be swapped in by ``functional_call``); otherwise the network's samples are
    folded at the input, which needs no probe (cached apart from the plans built outside).
    """
    if plan is not None and plan.valid_for(model):
        return plan
    if isinstance(model, SamplingModule) or not _holds_sampling(model):
        return _build_plan(model, None)  # nothing to probe
    inside = plans.get(("vmap", *key))
    if inside is None:
        _check_batch_first(model, model.named_modules())
        inside = plans[("vmap", *key)] = MCPlan(
            model, None, reason="first used inside torch.func.vmap, where no trace is checked"
        )
    return inside


def _fallback(model: nn.Module, reason: str) -> MCPlan:
    _check_batch_first(model, model.named_modules())
    warnings.warn(
        f"uq_box: {reason}; Monte Carlo samples of {type(model).__name__} are folded at the "
        f"input, so every layer runs on the S-fold batch (correct, but the layers before the "
        f"first stochastic one are not shared)",
        stacklevel=4,
    )
    return MCPlan(model, None, reason=reason)


def _check_batch_first(model: nn.Module, named_modules: Iterator[tuple[str, nn.Module]]) -> None:
    """Refuse layers that take the batch in dimension 1 where samples are folded (dim 0)."""
    for name, module in named_modules:
        batch_first = getattr(module, "batch_first", None)
        if batch_first is False:
            raise ValueError(
                f"layer {name!r} ({type(module).__name__}) of {type(model).__name__} takes the "
                f"batch in dimension 1 (batch_first=False), but uq_box folds Monte Carlo "
                f"samples into dimension 0 after the first stochastic layer; build it with "
                f"batch_first=True"
            )


def _build_plan(model: nn.Module, x: Tensor | None) -> MCPlan:
    if isinstance(model, SamplingModule):  # a single layer: it folds its input itself
        return MCPlan(model, None, single_layer=True)
    if not _holds_sampling(model):  # nothing samples: the network runs once, as it is
        return MCPlan(model, None, output_folded=False)
    if _has_hooks(model):
        return _fallback(model, "it has forward hooks of its own, which a traced graph would skip")
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as error:  # noqa: BLE001 -- any trace failure has the same safe answer
        return _fallback(model, f"torch.fx cannot trace it ({type(error).__name__}: {error})")
    graph_module = fx.GraphModule(model, graph)
    if tracer.opaque:  # the half-traced nodes of the modules kept whole
        graph.eliminate_dead_code()
        graph_module.recompile()
    modules = dict(graph_module.named_modules())
    folded = _folded_nodes(graph, modules)
    _check_batch_first(
        model,
        (
            (name, m)
            for node in graph.nodes
            if node.op == "call_module" and node in folded
            for name, m in modules[node.target].named_modules(prefix=node.target)
        ),
    )
    boundary = _boundary(graph, modules, folded)
    verdict = _probe(model, graph_module, x, boundary)
    if verdict is not None:
        return _fallback(model, verdict)
    output = next(n for n in graph.nodes if n.op == "output")
    output_folded = any(a in folded for a in output.all_input_nodes)
    _rewrite(graph, modules, folded, boundary)
    graph_module.recompile()
    return MCPlan(model, graph_module, output_folded=output_folded)


def _folded_nodes(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Nodes that depend on a sampling layer (their values are folded batches)."""
    folded: set[fx.Node] = set()
    for node in graph.nodes:
        seeds = node.op == "call_module" and _holds_sampling(modules[node.target])
        if seeds or any(a in folded for a in node.all_input_nodes):
            folded.add(node)
    folded.discard(next(n for n in graph.nodes if n.op == "output"))
    return folded


def _is_layer_call(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], SamplingModule)


def _boundary(
    graph: fx.Graph, modules: dict[str, nn.Module], folded: set[fx.Node]
) -> dict[fx.Node, list[fx.Node]]:
    """Plain nodes used by folded nodes, with the users that need them folded.

    A sampling layer takes its plain input as it is; any other folded node needs its plain
    batch-carrying inputs folded.
    """
    boundary: dict[fx.Node, list[fx.Node]] = {}
    for node in graph.nodes:
        if node not in folded or _is_layer_call(node, modules):
            continue
        for arg in node.all_input_nodes:
            if arg not in folded:
                boundary.setdefault(arg, []).append(node)
    return boundary


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps the values of the chosen nodes."""

    def __init__(self, module: fx.GraphModule, keep: set[fx.Node]) -> None:
        super().__init__(module)
        self.keep = keep
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.keep:
            self.values[n] = value
        return value


@contextmanager
def _untouched(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The probe leaves no trace: random generators and buffers (BatchNorm statistics) as they
    were, and the modules' forward hooks not called (they are off during the probe).
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    hooks = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for module, _, _ in hooks:
        module._forward_hooks, module._forward_pre_hooks = OrderedDict(), OrderedDict()
    devices = [] if device.type == "cpu" else [device]
    rng = torch.random.fork_rng(devices=devices, device_type=device.type)
    try:
        with rng, torch.no_grad():
            yield
    finally:
        for buffer, saved in buffers:
            buffer.data.copy_(saved)
        for module, forward_hooks, pre_hooks in hooks:
            module._forward_hooks, module._forward_pre_hooks = forward_hooks, pre_hooks


def _probe(
    model: nn.Module,
    graph_module: fx.GraphModule,
    x: Tensor,
    boundary: dict[fx.Node, list[fx.Node]],
) -> str | None:
    """Check the trace on ``x`` and classify the boundary; the reason to fall back, or None."""
    # a second batch size (BatchNorm in training mode needs 2 rows or more)
    small = x[: x.shape[0] - 1] if x.shape[0] > 2 else torch.cat([x, x])
    seed = 0
    with _untouched(model, x.device):
        try:
            torch.manual_seed(seed)
            expected = model(x)
            torch.manual_seed(seed)
            recorder = _Recorder(graph_module, set(boundary))
            traced = recorder.run(x)
            torch.manual_seed(seed)
            small_recorder = _Recorder(graph_module, set(boundary))
            small_recorder.run(small)
        except Exception as error:  # noqa: BLE001 -- a trace that fails to run is not used
            return f"its torch.fx trace fails to run ({type(error).__name__}: {error})"
    if not _same(expected, traced):
        return "its torch.fx trace computes something else than its forward"
    batch, small_batch = x.shape[0], small.shape[0]
    for node in boundary:
        big, little = recorder.values[node], small_recorder.values[node]
        if isinstance(big, Tensor):
            rows = (big.shape[0] if big.ndim else None, little.shape[0] if little.ndim else None)
            if rows == (batch, small_batch):
                continue  # carries the batch: folded where it meets folded values
            if big.shape == little.shape:
                boundary[node] = []  # no batch dimension (a parameter, a constant): as it is
                continue
            return (
                f"the value {node.format_node()} has shape {tuple(big.shape)} for a batch of "
                f"{batch}: it depends on the batch but not in dimension 0"
            )
        if _same(big, little):
            boundary[node] = []
            continue
        return (
            f"the value {node.format_node()} is computed from the batch before the first "
            f"stochastic layer and used after it (e.g. `x.size(0)`)"
        )
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    return bool(a == b)


def _rewrite(
    graph: fx.Graph,
    modules: dict[str, nn.Module],
    folded: set[fx.Node],
    boundary: dict[fx.Node, list[fx.Node]],
) -> None:
    """Insert the fold nodes and route plain inputs of sampling layers to :func:`call_unfolded`."""
    for node, users in boundary.items():
        if not users:
            continue
        with graph.inserting_after(node):
            fold = graph.call_function(fold_plain, (node,))
        for user in set(users):
            user.replace_input_with(node, fold)
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        module = modules[node.target]
        if isinstance(module, SamplingModule) and node.args[0] not in folded:
            function = call_unfolded
        elif isinstance(module, _BatchNorm) and node in folded:
            function = batch_norm_folded
        else:
            continue
        with graph.inserting_before(node):
            layer = graph.get_attr(node.target)
            call = graph.call_function(function, (layer, *node.args), node.kwargs)
        node.replace_all_uses_with(call)
        graph.erase_node(node)


@contextmanager
def _per_sample_batch_norm(batch_norms: list[_BatchNorm]) -> Iterator[None]:
    """Every BatchNorm layer sees folded batches (fold at the input): normalize per sample."""
    for module in batch_norms:
        module.forward = partial(batch_norm_folded, module)
    try:
        yield
    finally:
        for module in batch_norms:
            del module.forward


def batch_norm_folded(module: _BatchNorm, x: Tensor) -> Tensor:
    """A BatchNorm layer on a folded batch ``[S * N, C, ...]`` (graph node).

    In training mode each sample is normalized with its own batch statistics, as ``S`` separate
    passes would: the batch is viewed as ``[N, S * C, ...]`` for one ``F.batch_norm``. The running
    statistics move once, towards the mean of the samples' statistics. In eval mode (running
    statistics) the layer runs as it is.
    """
    state = current_mc_state()
    if state is None or not (module.training or module.running_mean is None):
        return type(module).forward(module, x)
    module._check_input_dim(x)
    num_samples, channels = state.num_samples, x.shape[1]
    state.check_folded(x, module)
    rows = x.shape[0] // num_samples
    per_sample = x.reshape(num_samples, rows, *x.shape[1:]).transpose(0, 1)
    per_sample = per_sample.reshape(rows, num_samples * channels, *x.shape[2:])
    momentum = 0.0 if module.momentum is None else module.momentum
    running_mean = running_var = None
    if module.training and module.track_running_stats and module.running_mean is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(module.num_batches_tracked)
        running_mean = module.running_mean.repeat(num_samples)
        running_var = module.running_var.repeat(num_samples)
    out = F.batch_norm(
        per_sample,
        running_mean,
        running_var,
        None if module.weight is None else module.weight.repeat(num_samples),
        None if module.bias is None else module.bias.repeat(num_samples),
        True,
        momentum,
        module.eps,
    )
    if running_mean is not None:
        with torch.no_grad():
            module.running_mean.copy_(running_mean.view(num_samples, channels).mean(0))
            module.running_var.copy_(running_var.view(num_samples, channels).mean(0))
    out = out.reshape(rows, num_samples, channels, *x.shape[2:]).transpose(0, 1)
    return out.reshape(x.shape)


__all__ = ["MCPlan", "batch_norm_folded", "call_unfolded", "fold_plain", "mc_plan"]
