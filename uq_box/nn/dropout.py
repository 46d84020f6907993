"""Dropout that samples its masks as a Monte Carlo dimension (Gal & Ghahramani 2016)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from uq_box.nn.sampling import SamplingModule, current_mc_state


class MCDropout(nn.Dropout, SamplingModule):
    """``nn.Dropout`` that stays active inside :func:`~uq_box.nn.sampling.mc_sampling`.

    Outside the context it is plain dropout (active in train mode only). Inside, it always drops,
    whatever the module's mode, so BatchNorm and other layers can stay in eval mode while the
    masks are sampled. Given a plain batch ``[N, ...]`` it folds it into ``[S * N, ...]``, so the
    layers before it run once (see :func:`~uq_box.nn.sample_forward`).
    """

    def forward(self, x: Tensor) -> Tensor:
        state = current_mc_state()
        if state is None:
            return super().forward(x)
        if state.input_folded:
            state.check_folded(x, self)
        else:
            x = state.fold(x)
        if state.noise_fn is None:
            return F.dropout(x, self.p, training=True, inplace=False)
        # replayable masks: keep where standard normal "mask" noise [S, N, ...] exceeds the
        # p-quantile, i.e. with probability 1 - p
        shape = (state.num_samples, x.shape[0] // state.num_samples, *x.shape[1:])
        eps = state.noise(self, "mask", shape, x).reshape(x.shape)
        if self.p == 1.0:
            return torch.zeros_like(x)
        keep = eps > torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(self.p)).item()
        return x * keep / (1.0 - self.p)


def to_mc_dropout(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Dropout`` in ``model`` by :class:`MCDropout` (same ``p``), in place.

    Raises:
        ValueError: the model has no dropout layer, or all have ``p == 0``.
    """
    from uq_box.nn.convert import disable_native_fast_paths

    found = []
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if type(child) is nn.Dropout:
                setattr(parent, name, MCDropout(child.p))
                found.append(child.p)
            elif isinstance(child, MCDropout):
                found.append(child.p)
    disable_native_fast_paths(model)
    if not found or not any(p > 0 for p in found):
        raise ValueError(
            f"`model` needs nn.Dropout layers with p > 0 for MC dropout, found "
            f"{len(found)} with p={found}; e.g. MLP(..., dropout_p=0.1)"
        )
    return model
