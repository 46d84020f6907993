"""Prediction sets: coverage, set size, and coverage stratified by set size or by class.

The functions take a boolean prediction set ``pred_set`` ``[N, C]`` (``True`` where class ``c``
is in the set of point ``n``; e.g. ``pred_set`` of
:class:`~uq_box.methods.conformal_classification.ConformalClassification`) and integer labels
``target`` ``[N]``. A conformal method at level ``alpha`` promises a *marginal* coverage of at
least ``1 - alpha``; the stratified coverages show where it is reached: the size-stratified
coverage of Angelopoulos, Bates, Malik & Jordan (2021, "Uncertainty Sets for Image Classifiers
using Conformal Prediction") should be near ``1 - alpha`` for every set size, and the
class-conditional coverage is what a class-conditional (Mondrian) method guarantees per class.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from uq_box.checks import number_in

__all__ = [
    "class_conditional_coverage",
    "mean_set_size",
    "set_coverage",
    "size_stratified_coverage",
    "size_stratified_coverage_violation",
]


def _check_sets(pred_set: Tensor) -> Tensor:
    """Check ``pred_set`` ``[N, C]`` of booleans (or 0/1); return it as booleans."""
    if not isinstance(pred_set, Tensor):
        raise TypeError(f"`pred_set` must be a torch.Tensor, got {type(pred_set).__name__}")
    if pred_set.ndim != 2 or pred_set.shape[1] == 0:
        raise ValueError(
            f"`pred_set` must have shape [N, C] (one row of class memberships per point), got "
            f"{list(pred_set.shape)}"
        )
    if pred_set.shape[0] == 0:
        raise ValueError("`pred_set` is empty")
    if pred_set.dtype != torch.bool:
        if pred_set.is_complex() or not bool(((pred_set == 0) | (pred_set == 1)).all()):
            raise ValueError(
                f"`pred_set` must hold booleans (or 0/1), got {pred_set.dtype} with other values"
            )
        pred_set = pred_set.bool()
    return pred_set


def _check_sets_target(pred_set: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check ``pred_set`` ``[N, C]`` and labels ``target`` ``[N]`` in ``[0, C)``."""
    pred_set = _check_sets(pred_set)
    if not isinstance(target, Tensor):
        raise TypeError(f"`target` must be a torch.Tensor, got {type(target).__name__}")
    if target.ndim != 1 or target.shape[0] != pred_set.shape[0]:
        raise ValueError(
            f"`target` must have shape [N] = [{pred_set.shape[0]}] to match `pred_set` "
            f"{list(pred_set.shape)}, got {list(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"`target` must hold integer class labels, got {target.dtype}")
    num_classes = pred_set.shape[1]
    if not bool(((target >= 0) & (target < num_classes)).all()):
        raise ValueError(f"`target` must hold class labels in [0, {num_classes}), got others")
    return pred_set, target.long()


def _covered(pred_set: Tensor, target: Tensor) -> Tensor:
    """``[N]`` booleans: whether each label is in its set."""
    return pred_set.gather(1, target[:, None]).squeeze(1)


def set_coverage(pred_set: Tensor, target: Tensor) -> Tensor:
    """Share of points whose label is in their prediction set (empirical marginal coverage).

    Args:
        pred_set: ``[N, C]`` booleans.
        target: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    pred_set, target = _check_sets_target(pred_set, target)
    return _covered(pred_set, target).double().mean()


def mean_set_size(pred_set: Tensor) -> Tensor:
    """Mean number of classes per prediction set (smaller is more informative at equal coverage).

    Args:
        pred_set: ``[N, C]`` booleans.

    Returns:
        Scalar float64 tensor in ``[0, C]``.
    """
    return _check_sets(pred_set).sum(1).double().mean()


def _size_counts(pred_set: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per set size ``0..C``: the number of points and of covered points, int64 ``[C + 1]``."""
    return _counts(pred_set.sum(1), _covered(pred_set, target), pred_set.shape[1] + 1)


def _counts(index: Tensor, covered: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Points and covered points per value of ``index`` ``[N]`` in ``[0, size)``, int64.

    Integer ``scatter_add_``: exact, and deterministic on every device.
    """
    zeros = torch.zeros(size, dtype=torch.long, device=index.device)
    count = zeros.scatter_add(0, index, torch.ones_like(index))
    return count, zeros.scatter_add(0, index, covered.long())


def size_stratified_coverage(pred_set: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage among the points with each set size ``0, 1, ..., C``.

    A method whose sets adapt to the difficulty of the input covers about ``1 - alpha`` at every
    size; one that does not over-covers the large sets and under-covers the small ones
    (Angelopoulos et al. 2021, section 4).

    Args:
        pred_set: ``[N, C]`` booleans.
        target: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        ``(coverage, count)``, each ``[C + 1]`` indexed by set size: the coverage (float64, 0
        where no set has that size) and the number of points (int64).
    """
    pred_set, target = _check_sets_target(pred_set, target)
    count, covered = _size_counts(pred_set, target)
    return covered.double() / count.clamp_min(1).double(), count


def size_stratified_coverage_violation(
    pred_set: Tensor, target: Tensor, alpha: float, size_bins: Sequence[int] | None = None
) -> Tensor:
    """Size-stratified coverage violation (SSCV, Angelopoulos et al. 2021, eq. 5).

    ``max_b |coverage(bin b) - (1 - alpha)|`` over the non-empty bins of set sizes. Lower is
    better; 0 means every bin of sizes is covered exactly at the nominal level.

    Args:
        pred_set: ``[N, C]`` booleans.
        target: integer labels ``[N]`` in ``[0, C)``.
        alpha: the nominal miscoverage level in ``(0, 1)``.
        size_bins: increasing upper edges (inclusive) of the size bins, e.g. ``[1, 3, 10]`` for
            sizes ``0-1, 2-3, 4-10, 11-C`` (the paper's ImageNet bins are ``[1, 3, 10, 100]``);
            ``None``: one bin per size.

    Returns:
        Scalar float64 tensor in ``[0, 1]``.
    """
    number_in(alpha, "alpha", 0.0, 1.0)
    pred_set, target = _check_sets_target(pred_set, target)
    count, covered = _size_counts(pred_set, target)
    if size_bins is not None:
        edges = list(size_bins)
        if not edges or any(int(e) != e or e < 0 for e in edges) or edges != sorted(set(edges)):
            raise ValueError(
                f"`size_bins` must be increasing non-negative integers (upper edges of the size "
                f"bins), got {size_bins!r}"
            )
        boundaries = torch.tensor([int(e) for e in edges], device=count.device)
        bin_of_size = torch.bucketize(torch.arange(len(count), device=count.device), boundaries)
        num_bins = len(edges) + 1
        count = torch.zeros(num_bins, dtype=torch.long, device=count.device).index_add_(
            0, bin_of_size, count
        )
        covered = torch.zeros_like(count).index_add_(0, bin_of_size, covered)
    filled = count > 0
    coverage = covered[filled].double() / count[filled].double()
    return (coverage - (1.0 - float(alpha))).abs().max()


def class_conditional_coverage(pred_set: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage among the points of each class (what a Mondrian method guarantees per class).

    Args:
        pred_set: ``[N, C]`` booleans.
        target: integer labels ``[N]`` in ``[0, C)``.

    Returns:
        ``(coverage, count)``, each ``[C]``: the coverage per class (float64, 0 for a class
        without points) and the number of points per class (int64).
    """
    pred_set, target = _check_sets_target(pred_set, target)
    num_classes = pred_set.shape[1]
    count, covered = _counts(target, _covered(pred_set, target), num_classes)
    return covered.double() / count.clamp_min(1).double(), count
