"""Ensemble members as one model: stacked parameters, one vectorized forward.

``M`` copies of one architecture keep their parameters stacked along a leading dimension and run
through ``torch.func.vmap`` over ``torch.func.functional_call``: one call (one optimizer step)
trains all members, and nothing is reloaded from disk to predict.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap


def _key(name: str) -> str:
    return name.replace(".", ":")


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
        self._buffer_names = list(buffers)
        # the architecture only: kept out of the module tree so it holds no state of its own
        object.__setattr__(self, "_template", copy.deepcopy(members[0]).to("meta"))

    def _stacked(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {k.replace(":", "."): v for k, v in self.params.items()}
        buffers = {n: getattr(self, "buffer:" + _key(n)) for n in self._buffer_names}
        return params, buffers

    def forward(self, x: Tensor) -> Tensor:
        """Every member on the same inputs ``[N, ...]``: ``[M, N, ...]``."""
        # the template sits outside the module tree: give it this module's train/eval mode
        if self._template.training != self.training:
            self._template.train(self.training)

        def call(params: dict[str, Tensor], buffers: dict[str, Tensor]) -> Tensor:
            return functional_call(self._template, (params, buffers), (x,))

        return vmap(call, randomness="different")(*self._stacked())

    def member(self, index: int) -> nn.Module:
        """A standalone copy of member ``index`` with its current weights."""
        module = copy.deepcopy(self._template).to_empty(
            device=next(iter(self.params.values())).device
        )
        params, buffers = self._stacked()
        state = {k: v[index].detach().clone() for k, v in {**params, **buffers}.items()}
        module.load_state_dict(state)
        return module.train(self.training)

    def extra_repr(self) -> str:
        return f"num_members={self.num_members}, architecture={type(self._template).__name__}"


def stack_members(
    model: nn.Module | Sequence[nn.Module], num_members: int | None
) -> StackedEnsemble:
    """Stack given members, or ``num_members`` (default 5) fresh copies of ``model``."""
    if isinstance(model, nn.Module) and not isinstance(model, nn.ModuleList):
        num_members = 5 if num_members is None else num_members
        if isinstance(num_members, bool) or not isinstance(num_members, int) or num_members < 1:
            raise ValueError(f"`num_members` must be a positive integer, got {num_members!r}")
        return StackedEnsemble([model] + [reinitialized(model) for _ in range(num_members - 1)])
    members = list(model)
    if num_members is not None and num_members != len(members):
        raise ValueError(
            f"`num_members`={num_members} but {len(members)} members were given; pass None"
        )
    return StackedEnsemble(members)


__all__ = ["StackedEnsemble", "reinitialized", "stack_members"]
