"""Test-time augmentation: Ayhan & Berens 2018, "Test-time data augmentation for estimation of
heteroscedastic aleatoric uncertainty in deep neural networks".

At prediction every input is augmented ``S`` times with user-given transforms and the ``S``
predictions form the sample dimension of the prediction contract. The augmented copies are
stacked into one batch ``[S * N, ...]``: one forward pass for all of them.

**What the uncertainty means.** The spread over augmentations is not a posterior over weights:
it measures how much the prediction moves when the input is perturbed in ways the user declares
label-preserving (the *augmentation spread*). It lands in ``epistemic_uct`` because it is the
spread of the sampled predictions (the contract's split: total = aleatoric + spread), but it is
a sensitivity to the input, not a Bayesian epistemic uncertainty; it does not shrink with more
training data. Wrapping a fitted stochastic method (MC dropout, a deep ensemble, ...) combines
both: the sample dimension holds every (weight sample, augmentation) pair.

``transforms`` is either

- a list of callables ``[N, ...] -> [N, ...]`` (e.g. flips, shifts; include ``nn.Identity()``
  for the original input): ``S`` is the list's length, each transform runs once per batch; or
- one callable, applied once to the ``S = num_mc_samples_test`` stacked copies ``[S * N, ...]``:
  a random transform that draws per row (e.g. :class:`GaussianNoise`) then gives ``S``
  independent augmentations of every point.

The network trains on the plain inputs (augmentation at training time belongs to the data
pipeline); a wrapped method must be fitted already, and TTA only predicts with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from uq_box.checks import non_negative_int, positive_finite, positive_int
from uq_box.methods.base import (
    ClassificationTask,
    LRSchedulerCallable,
    OptimizerCallable,
    RegressionTask,
    UQMethod,
)

Transform = Callable[[Tensor], Tensor]


class GaussianNoise(nn.Module):
    """Add ``N(0, std^2)`` noise to every input value (a random, per-row transform).

    Args:
        std: the noise's standard deviation, in the inputs' units.
    """

    def __init__(self, std: float = 0.1) -> None:
        super().__init__()
        self.std = positive_finite(std, "std")

    def forward(self, x: Tensor) -> Tensor:
        return x + self.std * torch.randn_like(x)


class Flip(nn.Module):
    """Reverse the order along ``dims`` (e.g. ``dims=[-1]``: a horizontal image flip).

    Args:
        dims: the dimensions of each input to flip (the batch dimension 0 excluded).
    """

    def __init__(self, dims: Sequence[int] = (-1,)) -> None:
        super().__init__()
        self.dims = [int(d) for d in dims]
        if not self.dims or 0 in self.dims:
            raise ValueError(f"`dims` must name input dimensions other than 0, got {dims!r}")

    def forward(self, x: Tensor) -> Tensor:
        return torch.flip(x, self.dims)


class TTAMethod(UQMethod):
    """Test-time augmentation for any task mixin (the family base).

    Args:
        model: a backbone (trained here on plain inputs, one forward pass per step), or a fitted
            method of the same task (a ``UQMethod``), which TTA only predicts with.
        transforms: a list of callables (``S`` = its length) or one callable applied to ``S``
            stacked copies (see the module docstring); required.
        criterion: the data loss (task default when ``None``; a wrapped method's criterion).
        optimizer: callable taking the parameters.
        lr_scheduler: callable taking the optimizer.
        num_mc_samples_test: augmentations per prediction when ``transforms`` is one callable
            (ignored for a list).
        burnin_epochs: epochs trained on the burn-in loss (regression: MSE of the mean).
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        transforms: nn.Module | Sequence[nn.Module] | Sequence[Transform] | Transform | None = None,
        num_mc_samples_test: int = 16,
        burnin_epochs: int = 0,
    ) -> None:
        wrapped = isinstance(model, UQMethod)
        if wrapped:
            task = type(self).__mro__[1]  # the task mixin, listed first
            if not isinstance(model, task):
                raise TypeError(
                    f"`model` of {type(self).__name__} must be a backbone or a fitted method of "
                    f"the same task (a {task.__name__}), got {type(model).__name__}"
                )
            if criterion is None:
                criterion = model.criterion
        super().__init__(model, criterion, optimizer, lr_scheduler)
        self.transforms = self._check_transforms(transforms)
        self.num_mc_samples_test = positive_int(num_mc_samples_test, "num_mc_samples_test")
        self.burnin_epochs = non_negative_int(burnin_epochs, "burnin_epochs")
        if wrapped and hasattr(model, "noise_std") and hasattr(self, "noise_std"):
            self.noise_std.copy_(model.noise_std)
        self.save_hyperparameters(
            ignore=["model", "criterion", "optimizer", "lr_scheduler", "transforms"]
        )

    @staticmethod
    def _check_transforms(transforms: object) -> list[Transform] | Transform:
        if transforms is None:
            raise ValueError(
                "`transforms` is required: a list of callables [N, ...] -> [N, ...] (one "
                "prediction each) or one random callable (applied to num_mc_samples_test copies)"
            )
        if callable(transforms) and not isinstance(transforms, nn.ModuleList | list | tuple):
            return transforms
        if not isinstance(transforms, Sequence | nn.ModuleList) or len(transforms) == 0:
            raise ValueError(
                f"`transforms` must be a non-empty list or a callable, got {transforms!r}"
            )
        bad = [t for t in transforms if not callable(t)]
        if bad:
            raise TypeError(f"every entry of `transforms` must be callable, got {bad[0]!r}")
        modules = all(isinstance(t, nn.Module) for t in transforms)
        return nn.ModuleList(transforms) if modules else list(transforms)

    @property
    def wraps_method(self) -> bool:
        """Whether ``model`` is a fitted method (else a backbone)."""
        return isinstance(self.model, UQMethod)

    def augment(self, x: Tensor, num_samples: int) -> tuple[Tensor, int]:
        """The augmented inputs stacked sample-major ``[K * N, ...]`` and ``K``."""
        if callable(self.transforms) and not isinstance(self.transforms, nn.ModuleList):
            copies = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(-1, *x.shape[1:])
            augmented, count = self.transforms(copies), num_samples
        else:
            views = [t(x) for t in self.transforms]
            for view in views:
                if not isinstance(view, Tensor) or view.shape != x.shape:
                    got = tuple(view.shape) if isinstance(view, Tensor) else type(view).__name__
                    raise ValueError(
                        f"a transform of `transforms` gave {got} for inputs of shape "
                        f"{tuple(x.shape)}; transforms must keep the shape"
                    )
            augmented, count = torch.cat(views), len(views)
        if not isinstance(augmented, Tensor) or augmented.shape[0] != count * x.shape[0]:
            raise ValueError(
                f"`transforms` must keep the shape of its input [S * N, ...] = "
                f"{(count * x.shape[0], *x.shape[1:])}"
            )
        return augmented, count

    def sample_outputs(self, x: Tensor, num_samples: int) -> Tensor:
        """Every augmentation (times every sample of a wrapped method) in one forward pass:
        ``[S, N, ...]``.
        """
        augmented, count = self.augment(x, num_samples)
        n = x.shape[0]
        if self.wraps_method:
            inner = self.model.sample_outputs(augmented, self.model.num_mc_samples_test)
            return inner.reshape(inner.shape[0] * count, n, *inner.shape[2:])
        out = self.model(augmented)
        return out.reshape(count, n, *out.shape[1:])

    def loss(self, x: Tensor, target: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """The data loss on the plain inputs (a wrapped method's own objective)."""
        if self.wraps_method:
            return self.model.loss(x, target)
        outputs = self.model(x).unsqueeze(0)
        nll = self.data_loss(outputs, target)
        if self.in_burnin:
            return {"loss": self.burnin_loss(outputs, target), "nll": nll}, outputs
        return {"loss": nll, "nll": nll}, outputs

    def on_fit_begin(self) -> None:
        """Refuse to train a wrapped method (its own hooks would not run)."""
        if self.wraps_method:
            raise TypeError(
                f"{type(self).__name__} wraps the fitted method {type(self.model).__name__} "
                f"(`model`) and only predicts: fit the method first, then wrap it for "
                f"trainer.validate/test/predict"
            )


class TTARegression(RegressionTask, TTAMethod):
    """Test-time augmentation for regression: the augmentation spread is ``epistemic_uct``."""


class TTAClassification(ClassificationTask, TTAMethod):
    """Test-time augmentation for classification: the augmentation spread is the mutual
    information ``epistemic_uct``.
    """
