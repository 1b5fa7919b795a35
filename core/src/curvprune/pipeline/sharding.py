"""Sharding a curvature estimator over torch.distributed ranks, by weights (column sharding).

Without sharding every rank holds the whole estimator state (all d×B WoodFisher blocks, all m×d
M-FAC gradients), so a second process adds no memory. An estimator that declares
:attr:`~curvprune.CurvatureEstimator.sharding` is instead split by weights:

* :func:`column_shares` cuts the selected weights ``[0, d)`` into one contiguous run per rank,
  balanced by the estimator's cost (:meth:`~curvprune.CurvatureEstimator.shard_cost`, its state
  memory per weight) and cut only where the estimator allows
  (:meth:`~curvprune.CurvatureEstimator.shard_alignment`: between parameters, or inside one at
  block boundaries, so that no block crosses a cut);
* every rank computes the per-sample gradients of its own chunks (data parallel) and one
  all-to-all per round hands each rank its columns of every chunk
  (:func:`curvprune.distributed.all_to_all_columns`), in the single-process row order;
* :class:`ShardedEstimator` presents the whole estimator to the scorers: inverse diagonals and
  IHVPs are computed by each owner on its columns and all-gathered (d numbers, the size of the
  model every rank holds anyway), entries of F⁻¹ come from the owner of their block.

So the O(d·B) or O(m·d) state lives once over all ranks, each rank does 1/W of the curvature
work, and the scores, the global threshold (computed from the same gathered vectors on every
rank: the exact k-th value) and the OBS updates are those of one process.
"""

from __future__ import annotations

import bisect
import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from curvprune.errors import ConfigError
from curvprune.roles.estimator import CurvatureEstimator, EstimatorConfig
from curvprune.tensors import distributed
from curvprune.tensors.layout import BlockLayout, ParamLayout

__all__ = ["OwnColumns", "ShardedEstimator", "column_shares", "maybe_shard", "piece_sizes",
           "share_layouts"]


def column_shares(
    sizes: Sequence[int],
    costs: Sequence[float],
    alignment: int | None,
    parts: int,
) -> list[tuple[int, int]]:
    """Cut ``[0, d)`` into ``parts`` contiguous runs of about equal cost.

    Args:
        sizes: weights per parameter, in layout order.
        costs: each parameter's cost (spread evenly over its weights).
        alignment: a cut may fall inside a parameter only at multiples of this many weights
            from its start; None: only between parameters.
        parts: the number of runs (ranks).

    Returns:
        ``parts`` ranges ``(lo, hi)`` tiling ``[0, d)`` in order; some may be empty when there
        are fewer places to cut than ranks (those ranks idle).
    """
    offsets = [0]
    cum_cost = [0.0]
    for size, cost in zip(sizes, costs, strict=True):
        offsets.append(offsets[-1] + int(size))
        cum_cost.append(cum_cost[-1] + max(float(cost), 0.0))
    total, d = cum_cost[-1], offsets[-1]
    cuts = [0]
    for r in range(1, parts):
        target = total * r / parts
        p = min(max(bisect.bisect_right(cum_cost, target) - 1, 0), len(sizes) - 1)
        size, spent = int(sizes[p]), cum_cost[p + 1] - cum_cost[p]
        within = 0.0 if spent <= 0 else (target - cum_cost[p]) / spent * size
        if alignment is None or alignment >= size:
            within = 0 if within < size / 2 else size  # the nearer parameter boundary
        else:
            within = min(round(within / alignment) * alignment, size)
        cuts.append(max(cuts[-1], offsets[p] + int(within)))
    cuts.append(d)
    return [(cuts[r], cuts[r + 1]) for r in range(parts)]


def piece_sizes(sizes: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """The sizes of the parameters' pieces within ``[lo, hi)`` and their parameter indices."""
    pieces, owners = [], []
    start = 0
    for index, size in enumerate(sizes):
        end = start + int(size)
        a, b = max(start, lo), min(end, hi)
        if a < b:
            pieces.append(b - a)
            owners.append(index)
        start = end
    return pieces, owners


def estimator_shares(
    estimator: CurvatureEstimator, sizes: Sequence[int], world: int
) -> list[tuple[int, int]]:
    """The column range of each of ``world`` ranks for ``estimator`` (as :meth:`setup` cuts)."""
    costs = [type(estimator).shard_cost(s, estimator.config) for s in sizes]
    alignment = 1 if estimator.sharding == "coupled" else estimator.shard_alignment()
    if estimator.fits_model:
        alignment = None  # a model-fitted estimator is set up on whole parameters
    return column_shares(sizes, costs, alignment, world)


def share_layouts(
    layout: ParamLayout, estimator: CurvatureEstimator, world: int
) -> list[ParamLayout]:
    """Each rank's pieces of ``layout`` when ``estimator`` is sharded over ``world`` ranks, as
    (partial) layouts for planning; an idle rank's layout is empty."""
    out = []
    for lo, hi in estimator_shares(estimator, layout.sizes, world):
        pieces, owners = piece_sizes(layout.sizes, lo, hi)
        out.append(ParamLayout(
            tuple(layout.names[i] for i in owners),
            tuple(torch.Size([n]) if n != layout.sizes[i] else layout.shapes[i]
                  for n, i in zip(pieces, owners, strict=True)),
            tuple(layout.module_types[i] for i in owners),
            partial=True,
        ))
    return out


class ShardedEstimator(CurvatureEstimator):
    """This rank's share of an estimator split over the ranks by weights; answers for all d.

    Args:
        inner: a fresh estimator whose :attr:`~CurvatureEstimator.sharding` is set; it is set
            up on this rank's columns only.

    The pipeline feeds :meth:`update` this rank's columns of every gradient row
    (:meth:`curvprune.GradientSource.iter_grads` with ``columns=``); every query is a
    collective that all ranks call alike (they run the same scorer on the same model).
    """

    reduction = "gather"  # nothing to all-reduce: the rows arrive already split by columns

    def __init__(self, inner: CurvatureEstimator) -> None:
        if inner.sharding is None:
            raise ConfigError(f"{type(inner).__name__} cannot be sharded over ranks @ estimator")
        super().__init__(inner.config)
        self.inner = inner
        self.fits_model = inner.fits_model  # type: ignore[misc]
        self.bounds: tuple[tuple[int, int], ...] = ()
        self._owners: list[int] = []
        self._count = 0
        self._diagonal: Tensor | None = None
        #: seconds spent inside the inner estimator (the per-rank report's "curvature")
        self.inner_seconds = 0.0

    # -- who owns what ------------------------------------------------------------------------
    @property
    def columns(self) -> tuple[int, int]:
        """This rank's columns ``[lo, hi)`` of the flat layout."""
        return self.bounds[distributed.rank()]

    @property
    def widths(self) -> list[int]:
        return [hi - lo for lo, hi in self.bounds]

    @property
    def idle(self) -> bool:
        """True on a rank that owns no weight (more ranks than places to cut)."""
        lo, hi = self.columns
        return hi == lo

    @property
    def block_layout(self) -> BlockLayout:
        return BlockLayout.build(self.sizes, self.config.block_size)

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        raise NotImplementedError("plan a sharded estimator with its inner estimator's shares")

    @property
    def num_samples(self) -> int:
        return self._count

    # -- life cycle ---------------------------------------------------------------------------
    def _setup(self) -> None:
        inner = self.inner
        self.bounds = tuple(estimator_shares(inner, self.sizes, distributed.world_size()))
        self._count = 0
        self._diagonal = None
        if inner.sharding == "coupled":
            inner._shard_sum = distributed.all_reduce_sum_
        lo, hi = self.columns
        pieces, self._owners = piece_sizes(self.sizes, lo, hi)
        if pieces:
            inner.setup(pieces, device=self.device)

    def update(self, grads: Tensor) -> None:
        """Accumulate this rank's columns ``[k, hi − lo]`` of a chunk of gradient rows."""
        self._require_setup("update")
        lo, hi = self.columns
        if grads.dim() != 2 or grads.shape[1] != hi - lo:
            raise ValueError(f"grads must have shape [k, {hi - lo}], got {tuple(grads.shape)}")
        self._diagonal = None
        self._count += grads.shape[0]
        if not self.idle and grads.shape[0]:
            with self._timed():
                self.inner.update(grads)

    def _update(self, grads: Tensor) -> None:  # pragma: no cover - update() is overridden
        raise AssertionError

    def fit(
        self,
        model: Any,
        batches: Iterable[Any],
        loss_fn: Any,
        layout: ParamLayout,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        """Fit the inner estimator on this rank's parameters only (whole parameters)."""
        self._diagonal = None
        if not self.idle:
            mine = layout.subset(self._owners)
            with self._timed():
                self.inner.fit(model, batches, loss_fn, mine, generator=generator)
        seen = torch.tensor([0 if self.idle else self.inner.num_samples], dtype=torch.int64)
        if distributed.is_distributed():
            torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        self._count = int(seen)

    # -- queries: owners compute, everyone gathers --------------------------------------------
    @contextlib.contextmanager
    def _timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.inner_seconds += time.perf_counter() - started

    def _local(self, width: int, *lead: int) -> Tensor:
        return torch.zeros(*lead, width, device=self.device, dtype=self.dtype)

    def _inverse_diagonal(self) -> Tensor:
        if self._diagonal is None:
            with self._timed():
                local = self._local(0) if self.idle else self.inner.inverse_diagonal()
            self._diagonal = distributed.all_gather_columns(local.to(self.device), self.widths)
        return self._diagonal

    def _ihvp(self, v: Tensor) -> Tensor:
        lo, hi = self.columns
        with self._timed():
            local = self._local(0, v.shape[0]) if self.idle else self.inner.ihvp(v[:, lo:hi])
        return distributed.all_gather_columns(local.to(self.device), self.widths)

    def _group_owners(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Each group's owning rank and whether it crosses a cut (only ``coupled`` may)."""
        cuts = torch.tensor([b for _, b in self.bounds[:-1]], device=idx.device)
        owner = torch.bucketize(idx, cuts, right=True)
        valid = idx >= 0
        first = owner.gather(1, valid.long().argmax(dim=1, keepdim=True)).squeeze(1)
        crossing = (valid & (owner != first[:, None])).any(dim=1)
        return first, crossing

    def inverse_block_solve(self, idx: Tensor, rhs: Tensor) -> Tensor:
        """Each rank solves the groups of its blocks; one all-gather of the ``[n, k]`` solutions
        (not of the ``[n, k, k]`` entries), so the k×k solves are split over the ranks too."""
        self._require_setup("inverse_block_solve")
        idx = idx.to(device=self.device, dtype=torch.long)
        first, crossing = self._group_owners(idx)
        if distributed.any_rank(bool(crossing.any())):
            return super().inverse_block_solve(idx, rhs)  # coupled: through IHVPs
        lo, _ = self.columns
        me = distributed.rank()
        mine = first == me
        with self._timed():
            local = rhs[mine]
            if bool(mine.any()):
                valid = idx[mine] >= 0
                local = self.inner.inverse_block_solve(
                    torch.where(valid, idx[mine] - lo, idx[mine]), rhs[mine]).to(rhs.dtype)
        counts = [int(c) for c in torch.bincount(first, minlength=len(self.bounds)).tolist()]
        every = distributed.all_gather_rows(local, counts)  # rank 0's groups, then rank 1's, …
        out = torch.empty_like(rhs)
        out[torch.argsort(first, stable=True)] = every
        return out

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Each group's entries come from the rank owning it (one all-reduce); groups that
        cross a cut (only for ``coupled`` estimators) go through IHVPs on unit vectors."""
        n, k = idx.shape
        lo, hi = self.columns
        valid = idx >= 0
        first, crossing = self._group_owners(idx)
        out = torch.zeros(n, k, k, device=self.device, dtype=self.dtype)
        mine = ~crossing & (first == distributed.rank()) & valid.any(dim=1)
        if bool(mine.any()):
            local = torch.where(valid[mine], idx[mine] - lo, idx[mine])
            with self._timed():
                out[mine] = self.inner.inverse_columns(local).to(self.dtype)
        distributed.all_reduce_sum_(out)
        if distributed.any_rank(bool(crossing.any())):
            if self.inner.sharding != "coupled":
                raise ValueError(
                    "a group of inverse_columns crosses two shards of a blocked estimator"
                )
            out[crossing] = super()._inverse_columns(idx[crossing])
        return out


class OwnColumns(CurvatureEstimator):
    """This rank's share of a :class:`ShardedEstimator` as the estimator of its own columns.

    Queries go to the share's estimator without gathering (an IHVP of a ``coupled`` share
    still sums its small vectors over the ranks inside), timed as the share's curvature work:
    what scoring on the owners (:mod:`curvprune.pipeline.owned`) hands its scorer.
    """

    def __init__(self, sharded: ShardedEstimator) -> None:
        inner = sharded.inner
        super().__init__(inner.config)
        self.sharded, self.inner = sharded, inner
        self.sizes, self.device, self.dtype = inner.sizes, inner.device, inner.dtype

    @property
    def block_layout(self) -> BlockLayout:
        return self.inner.block_layout

    @property
    def num_samples(self) -> int:
        return self.sharded.num_samples

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        raise NotImplementedError("plan a sharded estimator with its inner estimator's shares")

    def _setup(self) -> None:
        raise self.unsupported("setup", "set up the ShardedEstimator it views")

    def _update(self, grads: Tensor) -> None:
        raise self.unsupported("update(grads)", "feed the ShardedEstimator it views")

    def _ihvp(self, v: Tensor) -> Tensor:
        with self.sharded._timed():
            return self.inner.ihvp(v)

    def _inverse_diagonal(self) -> Tensor:
        with self.sharded._timed():
            return self.inner.inverse_diagonal()

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        with self.sharded._timed():
            return self.inner.inverse_columns(idx)


def shards(estimator: CurvatureEstimator | None, mode: Literal["auto", "off"]) -> bool:
    """Whether ``estimator`` is sharded over the ranks of a run: ``mode`` is ``"auto"`` and it
    declares :attr:`~curvprune.CurvatureEstimator.sharding` (and is not layer-local)."""
    return (
        estimator is not None
        and mode == "auto"
        and estimator.sharding is not None
        and not estimator.layer_local
    )


def maybe_shard(
    estimator: CurvatureEstimator | None, mode: Literal["auto", "off"]
) -> CurvatureEstimator | None:
    """The estimator to use for a step: sharded (:func:`shards`) when a process group is
    initialized (one rank included: the same code path), else as it is."""
    if estimator is None or not shards(estimator, mode) or not distributed.is_distributed():
        return estimator
    return ShardedEstimator(estimator)
