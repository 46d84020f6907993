"""Ensemble members as one model: stacked parameters, one vectorized forward.

``M`` copies of one architecture keep their parameters stacked along a leading dimension and run
through ``torch.func.vmap`` over ``torch.func.functional_call``: one call (one optimizer step)
trains all members, and nothing is reloaded from disk to predict.

:func:`map_stacked` is that vectorized call for any backbone, shared with the methods that predict
with stacked parameter samples (:class:`uq_box.methods.sampled.ParameterSampling`): attention on
kernels vmap batches, and a loop over the members where a forward cannot be vectorized.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import stack_module_state, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves, tree_map

from uq_box.checks import positive_int


def _key(name: str) -> str:
    return name.replace(".", ":")


@contextmanager
def batchable_attention(device: torch.device) -> Iterator[None]:
    """Attention on kernels that ``torch.func.vmap`` batches, for a forward on ``device``.

    Without it vmap runs these kernels through its fallback, a Python loop over the stacked
    dimension with a "performance drop" ``UserWarning`` at every call (same numbers):

    - the native fast path of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` (eval
      mode without gradients: ``aten::_transformer_encoder_layer_fwd``,
      ``aten::_native_multi_head_attention``) has no batching rule on any device; the global
      switch ``torch.backends.mha`` turns it off and the layers take their Python path;
    - on CPU ``F.scaled_dot_product_attention`` picks the flash kernel
      ``aten::_scaled_dot_product_flash_attention_for_cpu``, which has none either; the math
      backend (matmuls and a softmax) is batched. The CUDA kernels have batching rules and are
      left as they are.
    """
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if torch.device(device).type == "cpu":
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)


def map_stacked(
    owner: nn.Module,
    call: Callable[..., Tensor],
    stacked: Sequence[dict[str, Tensor]],
    device: torch.device,
    restore: Iterable[Tensor] = (),
    what: str = "members",
    training: bool | None = None,
) -> Tensor:
    """``torch.stack([call(*(slice i of stacked)) for i in range(S)])`` as one vmap call.

    ``stacked`` are tensors (or dicts or tuples of them) with the leading dimension ``S``; vmap
    runs with
    ``randomness="different"`` (dropout draws per member or sample).

    Some forwards cannot be vectorized: a Python number read from an activation (``.item()``,
    ``float(t)``, an ``if`` on a tensor), or an in-place op whose target is shared by the samples
    while its operand is not (torchvision's ``out += identity`` when only the shortcut is
    sampled). The first time vmap fails on ``owner`` (per train/eval mode of the network,
    ``training``, by default ``owner.training``), the buffers in
    ``restore`` get back the values they had before the attempt (a BatchNorm in training mode
    may have updated its statistics already), the ``S`` calls run one by one, and a
    ``UserWarning`` says so once; later calls in that mode loop directly. If the loop fails
    too, its error (the network's own) is raised.
    """
    mode = bool(owner.training if training is None else training)
    failed = owner.__dict__.setdefault("_vmap_failed", {})
    if not failed.get(mode, False):
        restore = list(restore)
        saved = [t.clone() for t in restore] if mode not in failed else None
        try:
            with batchable_attention(device):
                out = vmap(call, randomness="different")(*stacked)
            failed[mode] = False
            return out
        except RuntimeError as error:
            if saved is None:  # vectorized before in this mode: not a vmap limitation
                raise
            with torch.no_grad():
                for tensor, value in zip(restore, saved, strict=True):
                    tensor.copy_(value)
            reason = str(error).strip().splitlines()[0].split(". ")[0][:200]
    count = next(t for t in tree_leaves(stacked) if isinstance(t, Tensor)).shape[0]
    with batchable_attention(device):
        out = torch.stack(
            [call(*tree_map(lambda v: v[i], tuple(stacked))) for i in range(count)]  # noqa: B023
        )
    if not failed.get(mode, False):
        failed[mode] = True
        warnings.warn(
            f"{type(owner).__name__}: the {count} {what} cannot run as one torch.func.vmap call "
            f"in {'training' if mode else 'eval'} mode ({reason}); they run one by one from now "
            f"on (the same results, slower)",
            UserWarning,
            stacklevel=3,
        )
    return out


def _aliases(model: nn.Module) -> dict[str, dict[str, str]]:
    """Every parameter and buffer name, tied ones included, to the first name of its tensor."""
    result = {}
    for kind, named in (
        ("params", model.named_parameters(remove_duplicate=False)),
        ("buffers", model.named_buffers(remove_duplicate=False)),
    ):
        first: dict[int, str] = {}
        result[kind] = {name: first.setdefault(id(t), name) for name, t in named}
    return result


def _place(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Put each tensor in as the parameter or buffer of that dotted name (no copy, no cast)."""
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        slots = sub._parameters if leaf in sub._parameters else sub._buffers
        slots[leaf] = tensor


def _slots(
    template: nn.Module,
    aliases: dict[str, dict[str, str]],
    param_names: list[str],
    buffer_names: list[str],
) -> list[list[tuple[dict, str]]] | None:
    """For each stacked name, the ``(module._parameters or _buffers, leaf)`` of all its aliases.

    ``None`` when a module of ``template`` is parametrized (its tensors are computed).
    """
    if any(parametrize.is_parametrized(m) for m in template.modules()):
        return None
    slots: dict[str, list[tuple[dict, str]]] = {n: [] for n in param_names + buffer_names}
    for kind, table in (("_parameters", aliases["params"]), ("_buffers", aliases["buffers"])):
        for alias, name in table.items():
            owner, _, leaf = alias.rpartition(".")
            slots[name].append((getattr(template.get_submodule(owner), kind), leaf))
    return [slots[n] for n in param_names + buffer_names]


def _same_layout(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype


def reinitialized(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``reset_parameters`` called (a fresh random init)."""
    member = copy.deepcopy(model)
    for module in member.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return member


class StackedEnsemble(nn.Module):
    """``M`` networks of one architecture whose forward gives ``[M, N, ...]`` in one call.

    Args:
        members: the networks (same parameter and buffer names and shapes).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        members = list(members)
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise ValueError(f"`members` must be a non-empty list of nn.Module, got {members!r}")
        reference = {k: v.shape for k, v in members[0].state_dict().items()}
        for i, member in enumerate(members[1:], start=1):
            shapes = {k: v.shape for k, v in member.state_dict().items()}
            if shapes != reference:
                raise ValueError(
                    f"`members` must share one architecture; member {i} differs from member 0 "
                    f"in {sorted(set(shapes.items()) ^ set(reference.items()))[:3]}"
                )
            if repr(member) != repr(members[0]):  # parameter-free layers (activations, dropout)
                raise ValueError(
                    f"`members` must share one architecture; member {i} is {member!r}, "
                    f"member 0 is {members[0]!r}"
                )
        params, buffers = stack_module_state(members)
        self.num_members = len(members)
        self.params = nn.ParameterDict(
            {_key(k): nn.Parameter(v.detach()) for k, v in params.items()}
        )
        for name, value in buffers.items():
            self.register_buffer("buffer:" + _key(name), value.detach().clone())
        self._param_names = list(params)
        self._buffer_names = list(buffers)
        # every name of a parameter or buffer, tied aliases included (an output layer sharing
        # the embedding's weight), mapped to the name it is stacked under
        self._aliases = _aliases(members[0])
        # the architecture only: kept out of the module tree so it holds no state of its own.
        # Moving to "meta" gives each module its own new tensors, which unties shared weights;
        # tie them again, or functional_call (tie_weights=True) would leave the alias on meta
        template = copy.deepcopy(members[0]).to("meta")
        _place(
            template,
            {
                alias: template.get_parameter(name)
                for alias, name in self._aliases["params"].items()
            },
        )
        _place(
            template,
            {alias: template.get_buffer(name) for alias, name in self._aliases["buffers"].items()},
        )
        object.__setattr__(self, "_template", template)
        self._slots = _slots(template, self._aliases, self._param_names, self._buffer_names)

    def _tensors(self) -> tuple[Tensor, ...]:
        """The stacked parameters, then the stacked buffers, in the order of the slots."""
        params = tuple(self.params[_key(n)] for n in self._param_names)
        return params + tuple(getattr(self, "buffer:" + _key(n)) for n in self._buffer_names)

    @contextmanager
    def _swapped(
        self, tensors: Sequence[Tensor], replaced: dict[int, Tensor] | None = None
    ) -> Iterator[nn.Module]:
        """The template with ``tensors`` (one member's, or batched ones inside vmap) in place.

        The per-call cost of ``torch.func.functional_call`` (a module lookup per name) matters
        at every training step of small networks; the slots are looked up once. A template with
        parametrizations (``torch.nn.utils.parametrize``) goes through ``functional_call``.

        With ``replaced`` given, a tensor that the call put in place of one of ``tensors`` (a
        hook that assigns a new buffer instead of writing in place) is collected there, by its
        position in ``tensors``, when the context exits without an error.
        """
        template = self._template
        if self._slots is None:
            names = self._param_names + self._buffer_names
            state = dict(zip(names, tensors, strict=True))
            # on exit, the tensors found in place are written back into `state`
            with torch.nn.utils.stateless._reparametrize_module(template, state, tie_weights=True):
                yield template
            if replaced is not None:
                for index, (name, tensor) in enumerate(zip(names, tensors, strict=True)):
                    if state[name] is not tensor:
                        replaced[index] = state[name]
            return
        saved = []
        for slots, tensor in zip(self._slots, tensors, strict=True):
            for owner, leaf in slots:
                saved.append((owner, leaf, owner[leaf]))
                owner[leaf] = tensor
        try:
            yield template
            if replaced is not None:
                for index, (slots, tensor) in enumerate(zip(self._slots, tensors, strict=True)):
                    for owner, leaf in slots:
                        if owner[leaf] is not tensor:
                            replaced[index] = owner[leaf]
        finally:
            for owner, leaf, value in reversed(saved):
                owner[leaf] = value

    def call_members(
        self,
        fn: Callable[..., Any],
        *args: Any,
        in_dims: Sequence[int | None] | None = None,
        in_place: bool = False,
    ) -> Any:
        """``fn(template, *args)`` for every member at once: one ``torch.func.vmap`` call in
        which the template holds the member's parameters and buffers.

        ``args`` are batched along dimension 0 (one slice per member) where ``in_dims`` says 0
        and shared where it says ``None`` (default: all shared). Random draws differ between
        members (``randomness="different"``). The one stacked-parameter call of uq_box.

        ``fn`` may update the members' tensors in place (a buffer's ``copy_``, ``add_``); with
        ``in_place``, one that puts a new tensor in place of a parameter or buffer (inside vmap
        its value would be lost) is a ``RuntimeError``.
        """
        if self._template.training != self.training:
            self._template.train(self.training)
        dims = (0, *((None,) * len(args) if in_dims is None else in_dims))

        def call(tensors: tuple[Tensor, ...], *a: Any) -> Any:
            replaced: dict[int, Tensor] | None = {} if in_place else None
            with self._swapped(tensors, replaced) as template:
                out = fn(template, *a)
            if replaced:
                raise RuntimeError(
                    f"{self._names_of(replaced)} got a new tensor inside a vectorized call over "
                    f"the stacked members, where only in-place updates reach the stack; write "
                    f"them in place (`copy_`, `fill_`, `add_`) instead of assigning"
                )
            return out

        tensors = self._tensors()
        with batchable_attention(tensors[0].device):  # no per-member fallback for attention
            return vmap(call, in_dims=dims, randomness="different")(tensors, *args)

    def for_each_member(self, fn: Callable[[int, nn.Module], Any]) -> None:
        """``fn(index, template)`` for every member in turn, outside vmap and without gradients.

        The template holds views of member ``index``'s slices of the stacked tensors, so
        in-place writes (``copy_``, ``fill_``) land in the stack. For work that cannot be
        vectorized (a data-dependent fit, a loop over a loader). A tensor that ``fn`` puts in
        place of one of the member's (an assignment instead of an in-place write) is kept too: of
        the member's shape and dtype it is copied into the member's slice; a buffer that every
        member replaces by one of a new shape or dtype (a buffer sized by a fit) is stacked anew.
        Anything else (a parameter of a new shape, members that disagree) is a ``RuntimeError``.
        """
        if self._template.training != self.training:
            self._template.train(self.training)
        stacked = self._tensors()
        new: dict[int, list[Tensor | None]] = {}
        with torch.no_grad():
            for index in range(self.num_members):
                replaced: dict[int, Tensor] = {}
                with self._swapped(tuple(t[index] for t in stacked), replaced) as template:
                    fn(index, template)
                for position, tensor in replaced.items():
                    new.setdefault(position, [None] * self.num_members)[index] = tensor
            resized = {}
            for position, values in new.items():
                target = stacked[position]
                for index, value in enumerate(values):
                    if value is not None and _same_layout(value, target[index]):
                        target[index].copy_(value)
                        values[index] = None
                values = [v for v in values if v is not None]
                if not values:
                    continue
                name = self._names_of({position: values[0]})
                layouts = sorted({(tuple(v.shape), str(v.dtype)) for v in values})
                if position < len(self._param_names) or len(values) < self.num_members:
                    raise RuntimeError(
                        f"{name} got a tensor of a new shape or dtype {layouts} in "
                        f"{len(values)} of {self.num_members} members (the stack holds "
                        f"{tuple(target.shape[1:])}, {target.dtype}); only a buffer that every "
                        f"member resizes alike can be stacked anew"
                    )
                if len(layouts) > 1:
                    raise RuntimeError(
                        f"{name}: the members' new tensors differ in shape or dtype {layouts}; "
                        f"they cannot be stacked"
                    )
                resized[position] = torch.stack([v.to(target.device) for v in values])
        for position, value in resized.items():
            self._set_buffer(self._buffer_names[position - len(self._param_names)], value)

    def _names_of(self, positions: dict[int, Any]) -> str:
        """The dotted names of the stacked tensors at ``positions`` (see :meth:`_tensors`)."""
        names = self._param_names + self._buffer_names
        return ", ".join(f"`{names[p]}`" for p in sorted(positions))

    def _set_buffer(self, name: str, value: Tensor) -> None:
        """Replace the stacked buffer ``name`` by ``value`` ``[M, ...]`` of another shape."""
        setattr(self, "buffer:" + _key(name), value)
        meta = torch.empty(value.shape[1:], dtype=value.dtype, device="meta")
        aliases = [a for a, n in self._aliases["buffers"].items() if n == name]
        _place(self._template, dict.fromkeys(aliases, meta))

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """Resize a stacked buffer to a saved one of the same number of members (a buffer sized
        by a fit, see :meth:`for_each_member`); parameters must match.
        """
        for name in self._buffer_names:
            key = "buffer:" + _key(name)
            saved, current = state_dict.get(prefix + key), getattr(self, key)
            if (
                isinstance(saved, Tensor)
                and saved.shape != current.shape
                and saved.shape[:1] == current.shape[:1]
            ):
                self._set_buffer(name, torch.empty_like(saved, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _stacked(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {n: self.params[_key(n)] for n in self._param_names}
        buffers = {n: getattr(self, "buffer:" + _key(n)) for n in self._buffer_names}
        return params, buffers

    def forward(self, x: Tensor) -> Tensor:
        """Every member on the same inputs ``[N, ...]``: ``[M, N, ...]``."""
        # the template sits outside the module tree: give it this module's train/eval mode
        if self._template.training != self.training:
            self._template.train(self.training)

        def call(tensors: tuple[Tensor, ...]) -> Tensor:
            with self._swapped(tensors) as template:
                return template(x)

        tensors = self._tensors()
        # in training mode a BatchNorm updates the members' own stacked statistics in place
        return map_stacked(
            self, call, (tensors,), x.device, restore=tensors[len(self._param_names) :]
        )

    def reset_parameters(self) -> None:
        """A fresh random init of every member (``reset_parameters`` of each member's layers)."""
        params, _ = self._stacked()
        with torch.no_grad():
            for index in range(self.num_members):
                fresh = reinitialized(self.member(index))
                for name, value in fresh.named_parameters():
                    params[name][index].copy_(value)

    def member(self, index: int) -> nn.Module:
        """A standalone copy of member ``index`` with its current weights.

        The copy has the stacked tensors' device and dtype (also after ``.double()`` of the
        ensemble: ``load_state_dict`` would cast them to the template's dtype), its tied
        weights stay tied and its non-persistent buffers are filled too.
        """
        module = copy.deepcopy(self._template)
        params, buffers = self._stacked()
        own = {
            name: nn.Parameter(
                value[index].detach().clone(), module.get_parameter(name).requires_grad
            )
            for name, value in params.items()
        }
        _place(module, {alias: own[name] for alias, name in self._aliases["params"].items()})
        own = {name: value[index].detach().clone() for name, value in buffers.items()}
        _place(module, {alias: own[name] for alias, name in self._aliases["buffers"].items()})
        return module.train(self.training)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, architecture={type(self._template).__name__}"


def stack_members(
    model: nn.Module | Sequence[nn.Module], num_members: int | None
) -> StackedEnsemble:
    """Stack given members, or ``num_members`` (default 5) fresh copies of ``model``."""
    if isinstance(model, nn.Module) and not isinstance(model, nn.ModuleList):
        num_members = 5 if num_members is None else num_members
        positive_int(num_members, "num_members")
        return StackedEnsemble([model] + [reinitialized(model) for _ in range(num_members - 1)])
    members = list(model)
    if num_members is not None and num_members != len(members):
        raise ValueError(
            f"`num_members`={num_members} but {len(members)} members were given; pass None"
        )
    return StackedEnsemble(members)


__all__ = [
    "StackedEnsemble",
    "batchable_attention",
    "map_stacked",
    "reinitialized",
    "stack_members",
]
