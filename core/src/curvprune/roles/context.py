"""What a scorer sees at one pruning step (:class:`PruneContext`), and the unit of pruning.

:class:`PruneContext` is plain data the pipeline fills once per step; :data:`Granularity` says
whether a component works on single weights or on channel structures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import attrs
from torch import Tensor

from curvprune.roles.units import Granularity
from curvprune.tensors.layout import ParamLayout

if TYPE_CHECKING:
    from torch import nn

from curvprune.roles.estimator import CurvatureEstimator

__all__ = ["Granularity", "PruneContext"]



@attrs.define(kw_only=True)
class PruneContext:
    """What a scorer sees at one pruning step.

    Attributes:
        model: the model being pruned (weights already masked).
        layout: the selected parameters.
        weights: their current values, flat ``[d]``.
        mask: current keep-mask, bool ``[d]`` (False = pruned).
        target_sparsity: the sparsity this step prunes to.
        estimator: the fitted curvature estimator, if the pipeline has one.
        mean_grad: mean of the gradients fed to the estimator, ``[d]`` (None if not collected).
        batches: a callable returning an iterator of ``(inputs, targets)`` batches on the
            model's device, for scorers that need the model and data themselves;
            ``batches(num_samples=N)`` stops after N samples (the last batch cut). Under
            torch.distributed it yields this rank's slice of every batch
            (:func:`curvprune.distributed.shard`): pass N here rather than counting samples
            on the slices, accumulate sums over samples and all-reduce the sums and the
            sample count (``curvprune.distributed.all_reduce_sum_``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (mean over the batch).
        step: the index of this pruning step in the run.
        columns: None, or ``(lo, hi)`` when the context holds only the columns ``[lo, hi)`` of
            the selection (scoring on the owners of a sharded estimator, for scorers with
            ``columns_local``): ``layout``, ``weights``, ``mask`` and ``mean_grad`` are this
            rank's pieces, ``estimator`` answers for them, and any reduction over all weights
            (a maximum, a norm) must also reduce over the ranks.
    """

    model: nn.Module
    layout: ParamLayout
    weights: Tensor
    mask: Tensor
    target_sparsity: float
    estimator: CurvatureEstimator | None = None
    mean_grad: Tensor | None = None
    batches: Callable[..., Iterable[tuple[Any, Tensor]]] | None = None
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
    step: int = 0
    columns: tuple[int, int] | None = None

