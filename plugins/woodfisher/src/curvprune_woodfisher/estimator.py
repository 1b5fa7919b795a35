"""The ``woodfisher`` curvature estimator: blockwise inverse of the damped empirical Fisher.

Singh & Alistarh, "WoodFisher: Efficient Second-Order Approximation for Neural Network
Compression", NeurIPS 2020. With m gradients gᵢ and damping λ, every diagonal block b of::

    F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ                                    (paper Eq. 2, block-diagonal)

is inverted explicitly, as a batch ``[n_blocks, B, B]``, by one of two algorithms that give the
same matrix:

* ``woodbury``, the paper's recursion (Sherman–Morrison on Fₖ = Fₖ₋₁ + gₖgₖᵀ/m, paper Eq. 3)::

      F₀⁻¹ = I/λ,   vₖ = Fₖ₋₁⁻¹ gₖ,   Fₖ⁻¹ = Fₖ₋₁⁻¹ − vₖvₖᵀ / (m + gₖᵀvₖ)

  streamed one gradient at a time over all blocks at once. m is the *total* number of
  gradients, so it must be known up front: it is ``config.num_grads``, and a different number
  of gradients raises (:class:`curvprune.ConfigError`) instead of returning the inverse of a
  differently scaled matrix.
* ``gram``: accumulate Gₘ = Σᵢ gᵢgᵢᵀ per block with batched GEMMs (:class:`BlockRuns`), then at
  the first query a Cholesky LLᵀ = λI + Gₘ/m and F⁻¹ = (LLᵀ)⁻¹ by ``cholesky_inverse``, piece
  by piece over the blocks and in place (:func:`damped_block_inverse`: one block batch at the
  peak, single-threaded LAPACK shared among worker threads on the CPU, robust to thread
  contention; see docs/benchmarks.md). Any m works: the 1/m is applied at the end.

Padding slots of short blocks start at I/λ (``woodbury``) or get λ on the diagonal (``gram``) and
every gradient is zero there, so they never couple to a real coordinate and are dropped by
:meth:`curvprune.BlockLayout.unpack`.

Nothing but the block inverses (and, for ``gram``, the Gram matrices until the first query) is
stored: no gradient is kept, so there is no gradient-storage precision to choose.

Under torch.distributed (:attr:`WoodFisherEstimator.reduction`): ``gram`` sums, since Gₘ is a sum
over gradients: each rank accumulates the Gram blocks of its own rows and one all-reduce of the
``[n_blocks, B, B]`` batch (and of m) combines them; each rank then factorises its share of the
blocks and one all-gather shares the inverses; no gradient row is sent. ``woodbury`` gathers, since the recursion is sequential in the gradients: every rank
receives every row in the single-process order and runs the same recursion. Either way every rank
ends with the full block inverses (memory is not sharded).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from curvprune import (
    BlockLayout,
    ConfigError,
    CurvatureEstimator,
    EstimatorConfig,
    EstimatorStateError,
    GradientSource,
    NumericalError,
    ParamLayout,
    distributed,
)
from curvprune_woodfisher.blocks import BlockRuns
from curvprune_woodfisher.config import WoodFisherConfig
from curvprune_woodfisher.inverse import INVERT_PIECE_BYTES, damped_block_inverse

__all__ = [
    "AUTO_WOODBURY_RATIO",
    "WoodFisherEstimator",
    "choose_algorithm",
    "damped_block_inverse",
    "woodbury_update_",
]

#: ``auto`` uses the rank-1 recursion when ``num_grads · AUTO_WOODBURY_RATIO <= B`` (measured
#: crossover, docs/benchmarks.md): below it, m rank-1 passes over the blocks cost less than one
#: batched factorisation.
AUTO_WOODBURY_RATIO = 8

def choose_algorithm(config: WoodFisherConfig, width: int) -> Literal["woodbury", "gram"]:
    """Resolve ``config.algorithm`` for blocks of padded width ``width``."""
    if config.algorithm != "auto":
        return config.algorithm
    return "woodbury" if config.num_grads * AUTO_WOODBURY_RATIO <= width else "gram"


def woodbury_update_(inverse: Tensor, g: Tensor, m: int) -> None:
    """One step of the WoodFisher recursion (paper Eq. 3) on every block, in place.

    ``F⁻¹ ← F⁻¹ − vvᵀ/(m + gᵀv)`` with ``v = F⁻¹g``, applied as ``F⁻¹ ← F⁻¹ − ssᵀ`` with
    ``s = v/√(m + gᵀv)`` so the update is exactly symmetric in floating point.

    Args:
        inverse: ``[n_blocks, B, B]`` block inverses Fₖ₋₁⁻¹ (symmetric positive definite).
        g: ``[n_blocks, B]``, one gradient packed into blocks (zeros on padding slots).
        m: the total number of gradients of the estimate.

    """
    v = torch.bmm(inverse, g.unsqueeze(-1)).squeeze(-1)
    s = v * torch.rsqrt(m + (g * v).sum(-1, keepdim=True))
    inverse.baddbmm_(s.unsqueeze(-1), s.unsqueeze(-2), alpha=-1)


class WoodFisherEstimator(CurvatureEstimator):
    """Explicit block inverses of the damped empirical Fisher (WoodFisher).

    Args:
        config: a :class:`WoodFisherConfig` (defaults if None).

    Queries (:meth:`ihvp`, :meth:`inverse_diagonal`, :meth:`inverse_columns`) read the block
    inverses; before any gradient they raise :class:`EstimatorStateError`. With ``gram``, the
    first query factorises and frees the Gram matrices, after which :meth:`update` raises until
    the next :meth:`setup`. Each :meth:`update` of a hand-made chunk checks it for NaN/Inf (one
    host sync per chunk) before touching any state; a chunk yielded by a
    :class:`curvprune.GradientSource` is not scanned again (the source tracks it), and the
    source's :meth:`~curvprune.GradientSource.check_finite` runs before the first query.

    """

    config: WoodFisherConfig

    def __init__(self, config: WoodFisherConfig | None = None) -> None:
        super().__init__(config or WoodFisherConfig())
        self._blocks: BlockLayout | None = None
        self._runs: BlockRuns | None = None
        self._gram: Tensor | None = None
        self._inverse: Tensor | None = None
        self._slots: Tensor | None = None
        self._unchecked: list[GradientSource] = []  # sources whose check_finite is owed
        self._packed: Tensor | None = None
        self._count = 0
        self.algorithm: Literal["woodbury", "gram"] | None = None

    # -- planning -----------------------------------------------------------------------------
    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Peak state bytes: one ``n_blocks·B²`` block batch, plus ``gram``'s inversion work.

        ``woodbury`` updates one batch in place. ``gram`` holds the Gram batch while
        accumulating and inverts it in place, piece by piece (:func:`damped_block_inverse`):
        its work space is two pieces of :data:`INVERT_PIECE_BYTES` (or one per worker thread,
        ``torch.get_num_threads()``, if more: a Cholesky factor each on the CPU; the inverse
        and its selection elsewhere), never more than a second batch. Vectors of size d and
        the packed gradient row are negligible and not counted, as is the float64 copy of the
        (normally no) blocks whose float32 Cholesky fails.
        """
        config = _as_woodfisher(config)
        blocks = BlockLayout.build(sizes, config.block_size)
        block = blocks.width**2 * config.torch_dtype.itemsize
        batch = blocks.n_blocks * block
        if choose_algorithm(config, blocks.width) == "woodbury":
            return batch
        pieces = max(2, torch.get_num_threads()) * max(1, INVERT_PIECE_BYTES // block)
        return batch + min(blocks.n_blocks, pieces) * block

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """One ``n_blocks·B²`` batch: ``gram``'s inversion work exists only while it inverts."""
        config = _as_woodfisher(config)
        blocks = BlockLayout.build(layout.sizes, config.block_size)
        return blocks.n_blocks * blocks.width**2 * config.torch_dtype.itemsize

    @classmethod
    def plan_update_bytes(cls, rows: int, layout: ParamLayout, config: EstimatorConfig) -> int:
        """``gram``: the chunk's short blocks, gathered and padded (two copies of them); runs
        of full blocks are multiplied in place as views of the chunk (:class:`BlockRuns`).
        ``woodbury``: the default, one copy of the rows."""
        config = _as_woodfisher(config)
        blocks = BlockLayout.build(layout.sizes, config.block_size)
        if choose_algorithm(config, blocks.width) == "woodbury":
            return super().plan_update_bytes(rows, layout, config)
        n_short = int((blocks.lengths != blocks.width).sum())
        return 2 * rows * n_short * blocks.width * config.torch_dtype.itemsize

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """``woodbury``: 4·m·n_blocks·B²; ``gram``: 2·m·n_blocks·B² + (1/3 + 1 + 2)·n_blocks·B³."""
        config = _as_woodfisher(config)
        blocks = BlockLayout.build(sizes, config.block_size)
        nb, b, m = blocks.n_blocks, blocks.width, config.num_grads
        if choose_algorithm(config, b) == "woodbury":
            return 4.0 * m * nb * b**2
        return 2.0 * m * nb * b**2 + (1 / 3 + 1 + 2) * nb * b**3

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def block_layout(self) -> BlockLayout:
        """The diagonal blocks (cached after :meth:`setup`)."""
        return self._blocks if self._blocks is not None else super().block_layout

    @property
    def num_samples(self) -> int:
        """m: the number of gradients accumulated since :meth:`setup`."""
        return self._count

    @property
    def reduction(self) -> Literal["gather", "sum"]:  # type: ignore[override]
        """``"sum"`` for ``gram`` (additive Gram blocks), ``"gather"`` for ``woodbury``
        (sequential recursion). Before :meth:`setup` resolves ``auto``: ``"gather"``."""
        algorithm = self.algorithm or self.config.algorithm
        return "sum" if algorithm == "gram" else "gather"

    @property
    def sharding(self) -> Literal["separable", "coupled"] | None:  # type: ignore[override]
        """``"separable"`` when blocked (blocks never cross a parameter, so a run of whole
        blocks is estimated exactly on its own columns); None for one block over all weights."""
        return "separable" if self.config.block_size is not None else None

    def _all_reduce(self) -> None:
        """Sum the Gram blocks Gₘ and the count m over the ranks, then invert them (``gram``).

        After the all-reduce every rank holds the full Gₘ; rank r factorises only its share of
        the blocks (``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)``, :func:`damped_block_inverse`) and one
        all-gather hands every rank all the inverses, so the O(n_blocks·B³) factorisation is
        split across the ranks as well. Each block is factorised on its own, so the result is
        the one a single process computes from the same Gₘ.
        """
        if self._gram is None:
            raise EstimatorStateError(
                "woodfisher (gram) was already inverted; all_reduce() must come after the last "
                "update() and before any query"
            )
        if not any(source.rows_are_local for source in self._unchecked):
            self._owed_checks()  # sums already combined: every rank raises alike, before the Gram
        if self._count == 0:  # no chunk on this rank: Gₘ was never written (torch.empty)
            self._gram.zero_()
        distributed.all_reduce_sum_(self._gram)
        count = torch.tensor([self._count], dtype=torch.int64, device=self.device)
        self._count = int(distributed.all_reduce_sum_(count))
        if self._count == 0:
            return  # nothing seen on any rank: the first query says so
        n_blocks, size = self._gram.shape[0], distributed.world_size()
        bounds = [distributed.shard_bounds(n_blocks, r, size) for r in range(size)]
        lo, hi = bounds[distributed.rank()]
        mine = self._gram[lo:hi].clone()
        self._gram = None  # release Gₘ before the factorisation allocates
        failure: NumericalError | None = None
        try:
            mine = damped_block_inverse(mine, self._count, self.config.damping)
        except NumericalError as exc:  # overflowed blocks live on one rank: tell the others
            failure = exc
        if distributed.any_rank(failure is not None):
            raise failure or NumericalError(
                "the Gram matrix of woodfisher blocks on another rank overflowed; use "
                "dtype = 'float64'"
            )
        self._inverse = distributed.all_gather_rows(mine, [b - a for a, b in bounds])

    def _setup(self) -> None:
        self._blocks = BlockLayout.build(self.sizes, self.config.block_size)
        nb, width = self._blocks.n_blocks, self._blocks.width
        self.algorithm = choose_algorithm(self.config, width)
        self._count = 0
        self._gram = self._inverse = None
        self._unchecked = []
        if self.algorithm == "woodbury":
            eye = torch.eye(width, device=self.device, dtype=self.dtype) / self.config.damping
            self._inverse = eye.repeat(nb, 1, 1)
            # One packed gradient, reused: coordinates go to their slots, padding stays zero.
            self._slots = self._blocks.valid(self.device).reshape(-1).nonzero().squeeze(1)
            self._packed = torch.zeros(nb, width, device=self.device, dtype=self.dtype)
        else:
            self._runs = BlockRuns.build(self._blocks, self.device)
            # written whole by the first chunk (accumulate_(overwrite=True)), never zero-filled
            self._gram = torch.empty(nb, width, width, device=self.device, dtype=self.dtype)

    def _update(self, grads: Tensor) -> None:
        source = GradientSource.covering(grads)
        if source is None:  # chunks from a GradientSource are checked by it (_owed_checks)
            self._check_finite(grads)
        elif all(source is not seen for seen in self._unchecked):
            self._unchecked.append(source)
        k = grads.shape[0]
        if self.algorithm == "gram":
            if self._gram is None:
                raise EstimatorStateError(
                    "woodfisher (gram) was already inverted and freed its Gram matrices; call "
                    "setup() to start a new estimate"
                )
            assert self._runs is not None
            self._runs.accumulate_(self._gram, grads.contiguous(), overwrite=self._count == 0)
        else:
            m = self.config.num_grads
            if self._count + k > m:
                raise ConfigError(
                    f"woodfisher (woodbury) got {self._count + k} gradients but num_grads = {m} "
                    "fixes m in F = λI + (1/m)·Σggᵀ; feed exactly num_grads gradients or use "
                    "algorithm = 'gram' @ estimator.num_grads"
                )
            assert self._inverse is not None and self._packed is not None
            flat = self._packed.view(-1)
            for g in grads:  # the recursion is sequential in the gradients, batched over blocks
                flat.index_copy_(0, self._slots, g)
                woodbury_update_(self._inverse, self._packed, m)
            self._count += k
            self._check_inverse()
            return
        self._count += k

    def _check_inverse(self) -> None:
        """Raise :class:`NumericalError` if a ``woodbury`` block lost positive definiteness.

        In float32 with λ below the rounding of the Gram's scale (λ = 1e-7 on low-rank
        gradients), m + gᵀv can round to ≤ 0: rsqrt gives NaN, or the subtraction drives
        diagonal entries negative, silently. A positive definite inverse has a positive finite
        diagonal; checked once per chunk (one host sync, O(d) work). The recursion keeps no
        gradients, so unlike ``gram`` it cannot redo a block in float64.
        """
        assert self._inverse is not None and self._blocks is not None
        diag = self._inverse.diagonal(dim1=-2, dim2=-1)
        valid = self._blocks.valid(self.device)
        bad = valid & ~(torch.isfinite(diag) & (diag > 0))
        n_bad = int(bad.sum())
        if n_bad:
            self._owed_checks()  # a NaN gradient, not the damping, if a source says so
            raise NumericalError(
                f"woodfisher (woodbury) lost positive definiteness in {self.dtype} after "
                f"{self._count} of {self.config.num_grads} gradients: {n_bad} of {self.d} "
                f"inverse diagonal entries are NaN or <= 0 (damping = {self.config.damping:g} is "
                "below the rounding of the gradients' scale); use dtype = 'float64', "
                "algorithm = 'gram' (it redoes such blocks in float64) or a larger damping; "
                "call setup() to start over @ estimator.dtype"
            )

    # -- queries ------------------------------------------------------------------------------
    def _ready_inverse(self) -> Tensor:
        """Return the block inverses, computing them at the first query after the updates."""
        if self._blocks is None:
            raise EstimatorStateError("woodfisher is not set up; call setup(sizes) first")
        self._owed_checks()
        if self._count == 0:
            raise EstimatorStateError(
                "woodfisher has seen no gradients; call update() with [k, d] gradients before "
                "querying F⁻¹"
            )
        if self.algorithm == "woodbury" and self._count != self.config.num_grads:
            raise ConfigError(
                f"woodfisher (woodbury) saw {self._count} gradients but num_grads = "
                f"{self.config.num_grads} fixes m in F = λI + (1/m)·Σggᵀ; feed exactly num_grads "
                "gradients or use algorithm = 'gram' @ estimator.num_grads"
            )
        if self._gram is not None:
            self._inverse = damped_block_inverse(self._gram, self._count, self.config.damping)
            self._gram = None
        assert self._inverse is not None
        return self._inverse

    def _ihvp(self, v: Tensor) -> Tensor:
        blocks = self.block_layout
        packed = blocks.pack(v).permute(1, 2, 0)  # [n_blocks, B, n]
        out = torch.bmm(self._ready_inverse(), packed)
        return blocks.unpack(out.permute(2, 0, 1))

    def _inverse_diagonal(self) -> Tensor:
        return self.block_layout.unpack(self._ready_inverse().diagonal(dim1=-2, dim2=-1))

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Gather ``[F⁻¹]_{idx[r,i], idx[r,j]}`` from the block inverses, ``[n, k, k]``.

        The public :meth:`inverse_columns` has checked the range of ``idx`` and puts the
        identity on padding (``-1``) afterwards; a row that mixes blocks raises ``ValueError``.
        """
        inverse = self._ready_inverse()
        blocks = self.block_layout
        valid = idx >= 0
        flat = idx.clamp_min(0)
        block = blocks.block_of(self.device)[flat]
        # Every valid entry of a row must share the block of the row's first valid entry.
        first = torch.gather(block, 1, valid.long().argmax(1, keepdim=True))
        if bool((valid & (block != first)).any()):
            raise ValueError(
                "inverse_columns: each row of idx must lie in one diagonal block of woodfisher "
                f"(block_size = {self.config.block_size})"
            )
        pos = torch.where(valid, flat - blocks.starts.to(self.device)[first], 0)
        return inverse[first.unsqueeze(-1), pos.unsqueeze(-1), pos.unsqueeze(-2)]

    # -- checks -------------------------------------------------------------------------------
    def _check_finite(self, grads: Tensor) -> None:
        """Raise :class:`NumericalError` naming the parameter if ``grads`` has NaN or Inf.

        ``aminmax`` propagates NaN and keeps ±Inf, and is a pure reduction: no temporary the
        size of the chunk (``isfinite(grads).all()`` allocates 1.5 chunks). One host sync.
        """
        if bool(torch.isfinite(torch.stack(torch.aminmax(grads))).all()):
            return
        row, col = (int(i) for i in (~torch.isfinite(grads)).nonzero()[0])
        param = self._param_of(col)
        raise NumericalError(
            f"non-finite gradient for parameter {param} (layout order) at flat index {col}, "
            f"row {row} of the chunk; woodfisher state left unchanged"
        )

    def _owed_checks(self) -> None:
        """Run the finiteness checks owed to chunks that were fed unscanned.

        Those are :meth:`curvprune.GradientSource.check_finite` of each source whose chunks
        :meth:`curvprune.GradientSource.covering` vouched for; they are forgotten only once they
        pass, so an estimate built from a non-finite chunk never answers a query.
        """
        for source in self._unchecked:
            source.check_finite()
        self._unchecked = []

    def _param_of(self, flat_index: int) -> int:
        offsets = [0]
        for size in self.sizes:
            offsets.append(offsets[-1] + size)
        return bisect.bisect_right(offsets, flat_index) - 1


def _as_woodfisher(config: EstimatorConfig) -> WoodFisherConfig:
    if isinstance(config, WoodFisherConfig):
        return config
    raise TypeError(f"woodfisher needs a WoodFisherConfig, got {type(config).__name__}")
