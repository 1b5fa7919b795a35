"""Scoring on the owners: each rank scores, selects and updates its own columns.

A sharded estimator (:mod:`curvprune.pipeline.sharding`) answers every query for all d weights
by gathering its owners' answers, so a scorer working on the whole vector holds the weights,
the scores, the mask's selection and the update, four d-vectors, on every rank: at BERT-base
(d = 85 M) that is 1.27 GiB per rank beside its share of M-FAC's gradients. When the scorer is
``columns_local`` (OBS with the summed update) and the mask applier can select over split
scores (:meth:`~curvprune.MaskApplier.select_columns`: ``global``, ``layerwise``), each rank
instead, on its columns ``[lo, hi)`` only:

1. gathers its columns of the weights and scores them with its share's own answers
   (:class:`~curvprune.pipeline.sharding.OwnColumns`: its inverse diagonal; no gathering);
2. keeps or prunes them by the global rule, the exact k-th lowest score found by bisection
   with the counts summed over the ranks (:mod:`curvprune.builtin.lowest`);
3. computes its columns of the OBS update δw = −F⁻¹u (u is zero off the pruned weights, so
   u's columns are local; a ``coupled`` share sums its m-vectors over the ranks inside the
   IHVP) and its part of the predicted loss change, summed over the ranks;
4. all-gathers the updated weights (each rank's piece written straight into the parameters)
   and the keep-mask, so that every rank ends with the same model.

The result equals scoring the gathered vectors (the same selection, bit for bit; weights
within the round-off of the estimator's own queries), at about 4·d/W numbers per rank instead
of 4·d. Not used with idle ranks, joint OBS, structured masks or the single-weight audit:
those take the gathered path.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.errors import NumericalError
from curvprune.pipeline.sharding import OwnColumns, ShardedEstimator, share_layouts
from curvprune.pipeline.view import PipelineView
from curvprune.roles.context import PruneContext
from curvprune.tensors import distributed
from curvprune.tensors.layout import ParamLayout

__all__ = ["on_owners", "prune_on_owners", "scores_on_owners", "scoring_on_owners_bytes"]


def scores_on_owners(pipeline: PipelineView) -> bool:
    """Whether the components allow scoring on the owners of a sharded estimator: a
    ``columns_local`` scorer, a weight-granularity mask applier that selects over split
    scores, and no single-weight audit (it reads the whole vectors)."""
    return (
        pipeline.scorer.columns_local
        and pipeline.mask.granularity == "weight"
        and pipeline.mask.selects_columns
        and not pipeline.config.prune.audit_single
    )


def on_owners(pipeline: PipelineView, estimator: Any) -> bool:
    """Whether this step scores on the owners: :func:`scores_on_owners`, with a sharded
    estimator that leaves no rank idle."""
    return (
        isinstance(estimator, ShardedEstimator)
        and all(width > 0 for width in estimator.widths)
        and scores_on_owners(pipeline)
    )


def scoring_on_owners_bytes(d: int, share: int, itemsize: int) -> int:
    """The answering phase's vectors beside the estimator when scoring on the owners: four
    of the share's (its weights, scores, selection and update, as ``SCORING_VECTORS`` for the
    whole vector), or at the end the gathered weights (d, padded) beside the share's."""
    return max(4 * share, d + share) * itemsize


def gather_columns(layout: ParamLayout, model: nn.Module, lo: int, hi: int) -> Tensor:
    """A detached copy of the selected weights ``[lo, hi)`` of the flat layout."""
    pieces = []
    for param, start, size in zip(layout.parameters(model), layout.offsets, layout.sizes):
        a, b = max(start, lo), min(start + size, hi)
        if a < b:
            pieces.append(param.detach().reshape(-1)[a - start : b - start])
    return torch.cat(pieces)


@torch.no_grad()
def _write_gathered(layout: ParamLayout, model: nn.Module, every: Tensor,
                    bounds: Iterable[tuple[int, int]]) -> None:
    """Write rank r's piece ``every[r, :hi − lo]`` into the parameters' columns ``[lo, hi)``."""
    for param, start, size in zip(layout.parameters(model), layout.offsets, layout.sizes):
        flat = param.view(-1) if param.is_contiguous() else param.detach().reshape(-1).clone()
        for piece, (lo, hi) in zip(every, bounds, strict=True):
            a, b = max(start, lo), min(start + size, hi)
            if a < b:
                flat[a - start : b - start].copy_(piece[a - lo : b - lo])
        if not param.is_contiguous():  # written through a copy
            param.copy_(flat.view(param.shape))


def prune_on_owners(
    pipeline: PipelineView,
    estimator: ShardedEstimator,
    model: nn.Module,
    layout: ParamLayout,
    mask: Tensor,
    level: float,
    *,
    mean_grad: Tensor | None,
    batches: Any,
    loss_fn: Any,
    step: int,
) -> tuple[Tensor, Tensor | None]:
    """Score, select and update this rank's columns, then share the result (every rank).

    Writes the updated weights into ``model`` (pruned positions not yet zeroed: the caller
    applies the returned mask) and returns the new keep-mask ``[d]`` and the predicted loss
    change (summed over the ranks), or raises on every rank alike, the model untouched.
    """
    scorer, applier = pipeline.scorer, pipeline.mask
    lo, hi = estimator.columns
    share = share_layouts(layout, estimator.inner, distributed.world_size())[distributed.rank()]
    ctx = PruneContext(
        model=model, layout=share, weights=gather_columns(layout, model, lo, hi),
        mask=mask[lo:hi], target_sparsity=level, estimator=OwnColumns(estimator),
        mean_grad=None if mean_grad is None else mean_grad[lo:hi], batches=batches,
        loss_fn=loss_fn, step=step, columns=(lo, hi),
    )
    scores = scorer.score(ctx)
    keep = applier.select_columns(scores, mask, level, layout, (lo, hi))
    del scores
    if keep is None or keep.shape != ctx.mask.shape or bool((keep & ~ctx.mask).any()):
        raise NumericalError(
            f"mask applier {pipeline.config.mask.name!r} revived pruned weights or returned a "
            "mask of the wrong shape for its columns"
        )
    pruned = ctx.mask & ~keep
    delta = scorer.compensate(ctx, pruned)
    predicted = scorer.predicted_loss_change(ctx, pruned)
    weights = ctx.weights
    bad = delta is not None and not bool(torch.isfinite(delta).all())
    if distributed.any_rank(bad):  # every rank refuses, before anything is written
        raise NumericalError(
            f"the compensating update of scorer {pipeline.config.scorer.name!r} is not finite; "
            "increase the estimator's damping or use dtype = 'float64'"
        )
    if delta is not None:
        weights.add_(delta.to(weights.dtype))
        del delta
    weights.mul_(keep)
    if predicted is not None:
        predicted = distributed.all_reduce_(predicted.double().reshape(1), "sum").reshape(())
    widths = estimator.widths
    padded = torch.nn.functional.pad(weights, (0, max(widths) - weights.numel()))
    del weights, ctx
    # [W, widest]: d numbers and the padding, written into the parameters piece by piece
    every = distributed.all_gather_stack(padded)
    del padded
    _write_gathered(layout, model, every, estimator.bounds)
    del every
    new_mask = distributed.all_gather_columns(keep.to(torch.uint8), widths).bool()
    return new_mask, predicted
