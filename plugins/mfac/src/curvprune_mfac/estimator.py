"""The ``mfac`` curvature estimator: M-FAC's static or dynamic algorithm behind the core contract.

Frantar, Kurtic & Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
Information", NeurIPS 2021. F = λI + (1/m)·Σᵢ gᵢgᵢᵀ (λ absolute, the outer products averaged),
block diagonal with ``block_size`` or, by default, one block over all selected weights. Blocks
run as one batched ``[b, m, W]`` tensor (:meth:`curvprune.BlockLayout.pack`); the unblocked case
uses the gradient rows as they are (b = 1, W = d), with no copy.

* ``static`` (:mod:`curvprune_mfac.static`): gradients are stored as fed; the first query builds
  Ŵ = C⁻¹G/λ in place (O(d·m²) once), then F⁻¹x costs O(d·m), the diagonal O(d·m), one entry
  O(m). The estimate is frozen from then on (its coefficients depend on every gradient);
  :meth:`setup` starts a new one.
* ``dynamic`` (:mod:`curvprune_mfac.dynamic`): a window of the last ``window`` gradients; each
  update costs O(d·m) per gradient plus one O(m³) refactorization before the next query, F⁻¹x
  costs O(d·m + m²), and updates may follow queries indefinitely.

Blocks (``blocks``): ``"alive"`` (the default for ``static``, the reference pruner's
``HInvFastBlock(grads[:, mask])``) gathers the live coordinates, those where some gradient fed is
non-zero, and cuts them into consecutive blocks of B live weights across parameters; the other
coordinates get F⁻¹e_q = e_q/λ. ``"fixed"`` cuts each parameter into blocks of B, pruned weights
included (:class:`curvprune.BlockLayout`).

Both average over the gradients actually held: with fewer than ``num_grads`` (static) or than
``window`` (dynamic), F is exactly λI + (1/n)·Σ over those n.

Under torch.distributed both gather (``reduction = "gather"``): the static algorithm stores the
gradient matrix G row by row (Ŵ = C⁻¹G/λ is tied to the row order through the Cholesky factor)
and the dynamic one keeps a window whose content depends on the order of arrival, so every rank
receives every gradient row in the single-process order and builds the same state. Each rank
holds the whole m·d matrix (memory is not sharded).
"""

from __future__ import annotations

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
)
from curvprune_mfac.config import MFACConfig
from curvprune_mfac.dynamic import DIAGONAL_PIECES, SlidingWindow
from curvprune_mfac.static import StaticInverse

__all__ = ["MFACEstimator"]

#: Pieces G is read in when the ``alive`` blocks are cut (the work space is 1/_PIECES of G).
_PIECES = 16


class MFACEstimator(CurvatureEstimator):
    """M-FAC inverse-Fisher products, diagonal and entries; static or sliding-window.

    Memory: the gradient matrix (m·d numbers at ``dtype``, padded to b·W per row when blocked)
    plus float64 m×m matrices per block (see :meth:`memory_bytes`).
    """

    config: MFACConfig
    reduction = "gather"

    def __init__(self, config: MFACConfig | None = None) -> None:
        super().__init__(config or MFACConfig())
        self._blocks: BlockLayout | None = None
        self._grads: Tensor | None = None  # static: G [b, num_grads, W] until frozen
        self._static: StaticInverse | None = None
        self._window: SlidingWindow | None = None
        self._count = 0
        self._alive: Tensor | None = None  # "alive" blocks: live flat indices, once frozen
        self._unchecked: list[GradientSource] = []  # sources whose check_finite is owed

    # -- sizes --------------------------------------------------------------------------------
    @staticmethod
    def _shape(sizes: Sequence[int], config: MFACConfig) -> tuple[int, int, int]:
        """(b, m, W): blocks, gradient rows stored, padded block width."""
        rows = config.num_grads if config.algorithm == "static" else config.window_size
        if config.alive_blocks:
            assert config.block_size is not None
            d = int(sum(sizes))
            width = min(config.block_size, d)
            return -(-d // width), rows, width
        blocks = BlockLayout.build(sizes, config.block_size)
        return blocks.n_blocks, rows, blocks.width

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """b·m·W·itemsize for G (Ŵ overwrites it) + b·m²·(16 + itemsize) for K, C and C⁻¹.

        ``alive`` blocks: G is stored whole and then packed, so the peak is the larger of two
        copies of G and the above (b·W ≥ d is the packed width for all weights live).

        ``dynamic`` adds the piece of Ŵ its diagonal query forms at a time (1/8 of G); every
        query holds three d-vectors (which matter beside a small window).
        """
        cfg = _as_mfac(config)
        b, m, width = cls._shape(sizes, cfg)
        itemsize = cfg.storage_torch_dtype.itemsize
        # the m×m algebra, built in place: the float32 Gram, capacitance and factor, then the
        # factor and C⁻¹ (float64), then C⁻¹/λ in both dtypes: 2.5 float64 batches at most
        total = b * m * width * itemsize + b * m * m * (2 * 8 + cfg.torch_dtype.itemsize)
        if cfg.alive_blocks:  # G whole, then its live columns packed: two copies at a time
            total = max(2 * b * m * width * itemsize, total)
        if cfg.algorithm == "dynamic":
            total += b * m * -(-width // DIAGONAL_PIECES) * itemsize
        # a query's d-vectors: its result, the scaled input and the correction
        return total + 3 * b * width * cfg.torch_dtype.itemsize

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """While gradients stream in the static algorithm holds G alone (b·m·W, or m·d whole
        for ``alive`` blocks): the m×m algebra and a query's d-vectors come after the last
        update. The sliding window's state is its whole peak."""
        cfg = _as_mfac(config)
        itemsize = cfg.storage_torch_dtype.itemsize
        if cfg.alive_blocks:
            return cfg.num_grads * layout.d * itemsize
        if cfg.algorithm == "static":
            b, m, width = cls._shape(layout.sizes, cfg)
            return b * m * width * itemsize
        return super().plan_held_bytes(layout, config)

    @classmethod
    def plan_update_bytes(cls, rows: int, layout: ParamLayout, config: EstimatorConfig) -> int:
        """Unblocked static (and ``alive``, packed only when frozen) stores the rows as they
        come, a view written straight into G: no copy beside them (a cast is written in
        place too). Fixed blocks pack each chunk into padded blocks (one copy); the window
        keeps the default."""
        cfg = _as_mfac(config)
        if cfg.algorithm == "static" and (cfg.block_size is None or cfg.alive_blocks):
            return 0
        return super().plan_update_bytes(rows, layout, config)

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """static: 4·m²·b·W (Gram and Ŵ GEMMs) + b·m³; dynamic: 2·num_grads·m·b·W + b·m³/3."""
        cfg = _as_mfac(config)
        b, m, width = cls._shape(sizes, cfg)
        if cfg.algorithm == "static":
            return float(4 * m * m * b * width + b * m**3)
        return float(2 * cfg.num_grads * m * b * width + b * m**3 / 3)

    @property
    def sharding(self) -> Literal["separable", "coupled"] | None:  # type: ignore[override]
        """``"separable"`` with fixed blocks (they never cross a parameter), ``"coupled"`` for
        the unblocked static algorithm (GGᵀ and Ŵx are sums over the columns, see
        :mod:`curvprune_mfac.static`), None for ``alive`` blocks (they cross parameters and
        move with the mask) and the unblocked window (one collective per gradient)."""
        cfg = self.config
        if cfg.alive_blocks:
            return None
        if cfg.block_size is not None:
            return "separable"
        return "coupled" if cfg.algorithm == "static" else None

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """m: gradients in the estimate (static: all fed; dynamic: those in the window)."""
        return self._window.count if self._window is not None else self._count

    def _setup(self) -> None:
        self._blocks = BlockLayout.build(self.sizes, self.config.block_size)
        b, m, width = self._shape(self.sizes, self.config)
        self._static, self._window, self._grads, self._count = None, None, None, 0
        self._alive = None
        self._unchecked = []
        # G is never zero-filled: update writes rows [count, count + k) whole (padding columns
        # included, BlockLayout.pack zero-pads) and only rows [0, count) are ever read
        stored = self.config.storage_torch_dtype
        if self.config.alive_blocks:  # G whole; blocks of live columns are cut when frozen
            self._grads = torch.empty(1, m, self.d, dtype=stored, device=self.device)
        elif self.config.algorithm == "static":
            self._grads = torch.empty(b, m, width, dtype=stored, device=self.device)
        else:
            self._window = SlidingWindow(b, m, width, damping=self.config.damping,
                                         dtype=self.dtype, device=self.device)

    def _update(self, grads: Tensor) -> None:
        """Store or push ``grads``; non-finite rows are refused before any state changes.

        A chunk yielded by a :class:`curvprune.GradientSource` is not scanned here: the source
        tracks its finiteness already (:meth:`curvprune.GradientSource.covering`), and its
        :meth:`~curvprune.GradientSource.check_finite` runs before the first query (the
        pipeline runs it right after collecting). Anything else is scanned now.
        """
        source = GradientSource.covering(grads)
        if source is None:
            _refuse_non_finite(grads)
        elif all(source is not seen for seen in self._unchecked):
            self._unchecked.append(source)
        if self.config.alive_blocks:
            packed = grads.unsqueeze(0)  # [1, k, d]: the live set is known only when frozen
        else:
            packed = self._pack(grads).transpose(0, 1)  # [b, k, W]
        if self._window is not None:
            self._window.push(packed)
            return
        if self._static is not None:
            raise EstimatorStateError(
                "mfac (static) cannot take gradients after it has been queried: its "
                "coefficients depend on all m gradients. Call setup() to start a new estimate, "
                "or use algorithm = 'dynamic' to keep adding gradients"
            )
        assert self._grads is not None
        k, capacity = grads.shape[0], self._grads.shape[1]
        if self._count + k > capacity:
            raise ConfigError(
                f"mfac (static) got {self._count + k} gradients but stores num_grads={capacity}; "
                "raise num_grads @ estimator.num_grads"
            )
        self._grads[:, self._count : self._count + k] = packed
        self._count += k

    # -- queries ------------------------------------------------------------------------------
    def _backend(self) -> StaticInverse | SlidingWindow:
        for source in self._unchecked:  # kept until they pass: a NaN estimate never answers
            source.check_finite()
        self._unchecked = []
        if self.num_samples == 0:
            raise EstimatorStateError(
                "mfac has no gradients yet: call setup(sizes) and update([k, d] gradients) "
                "before querying the inverse"
            )
        if self._window is not None:
            return self._window
        if self._static is None:
            assert self._grads is not None
            if self.config.alive_blocks:
                self._static = self._freeze_alive()
                return self._static
            grads = self._grads[:, : self._count]
            self._static = StaticInverse.from_gradients_(
                grads, self._count, self.config.damping, dtype=self.dtype,
                reduce=self.sum_over_shards,
            )
            self._grads = None  # Ŵ lives in the same storage
        return self._static

    def _ihvp(self, v: Tensor) -> Tensor:
        backend = self._backend()
        # Scale each row by a power of two near its largest entry (exact in binary floating
        # point): v/λ and the correction then stay clear of underflow and overflow whatever the
        # scale of v (F⁻¹ is linear, so the scale is put back exactly).
        # (sharded: the sum of the shards' maxima, within W× of the largest: a common scale)
        amax = self.sum_over_shards(v.abs().amax(dim=1, keepdim=True))
        scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax))), 1.0)
        v = v / scale
        if self._alive is not None:  # dead coordinates: (F⁻¹v)_q = v_q/λ
            out = v / self.config.damping
            out[:, self._alive] = self._unpack_alive(backend.ihvp(self._pack_alive(v)))
            return out * scale
        return self._unpack(backend.ihvp(self._pack(v))) * scale

    def _inverse_diagonal(self) -> Tensor:
        backend = self._backend()
        if self._alive is not None:
            out = torch.full((self.d,), 1.0 / self.config.damping, dtype=self.dtype,
                             device=self.device)
            out[self._alive] = self._unpack_alive(backend.diagonal())
            return out
        return self._unpack(backend.diagonal())

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """[F⁻¹]_pq = δ_pq/λ − ⟨Ŵ_:p, Ŵ_:q⟩ for each row's pairs: O(n·k²·m), no IHVP.

        Args:
            idx: long ``[n, k]``, each row's indices in one block, ``-1`` padding (the base class
                puts the identity there).

        Returns:
            ``[n, k, k]``.
        """
        backend = self._backend()
        if self._alive is not None:
            return self._alive_columns(backend, idx)
        assert self._blocks is not None
        k = idx.shape[1]
        valid = idx >= 0
        block_of = self._blocks.block_of(self.device)
        starts = self._blocks.starts.to(self.device)
        safe = idx.clamp_min(0)
        block = block_of[safe.max(dim=1).values]  # [n]; an all-padding row reads block of 0
        if bool((valid & (block_of[safe] != block[:, None])).any()):
            raise ValueError(
                f"inverse_columns: each row of idx must lie in one block of block_size="
                f"{self.config.block_size}, got {idx.tolist()}"
            )
        position = torch.where(valid, safe - starts[block, None], 0)
        cols = backend.columns(block, position)  # [n, k, m]
        eye = torch.eye(k, dtype=self.dtype, device=self.device)
        return eye / self.config.damping - cols @ cols.mT

    # -- "alive" blocks ------------------------------------------------------------------------
    def _freeze_alive(self) -> StaticInverse:
        """Gather the live columns of G, cut them into blocks of B, build Ŵ on them.

        Both passes over G go in ``_PIECES`` column pieces, so the only full-size tensors are
        G and the packed blocks: two copies of G (and one piece) at the peak, as
        :meth:`memory_bytes` plans (a whole-matrix ``ne`` or fancy index would add a third).
        """
        assert self._grads is not None and self.config.block_size is not None
        grads = self._grads[0, : self._count]  # [m, d]
        m, d = grads.shape
        step = max(self.config.block_size, -(-d // _PIECES))
        live = torch.empty(d, dtype=torch.bool, device=self.device)
        for start in range(0, d, step):  # pieces of columns, not single weights
            live[start : start + step] = grads[:, start : start + step].ne(0).any(dim=0)
        self._alive = live.nonzero().squeeze(1)
        del live
        n = int(self._alive.numel())
        width = max(1, min(self.config.block_size, n))
        n_blocks = max(1, -(-n // width))
        packed = torch.empty(n_blocks, m, width, dtype=grads.dtype, device=self.device)
        per = max(1, step // width)  # blocks per piece
        for first in range(0, n_blocks, per):
            last = min(n_blocks, first + per)
            cols = self._alive[first * width : last * width]
            piece = grads[:, cols]  # [m, ≤ (last − first)·W]
            short = (last - first) * width - cols.numel()
            if short:  # the last block's padding: zeros
                piece = torch.cat([piece, piece.new_zeros(m, short)], dim=1)
            packed[first:last] = piece.reshape(m, last - first, width).transpose(0, 1)
        del grads
        self._grads = None  # at most two copies of G at a time (memory_bytes)
        return StaticInverse.from_gradients_(packed, self._count, self.config.damping,
                                             dtype=self.dtype)

    def _pack_alive(self, x: Tensor) -> Tensor:
        """``[n, d]`` to ``[n, b, B]``: the live coordinates, zero-padded after the last."""
        assert self._alive is not None and self._static is not None
        b, _, width = self._static.scaled.shape
        n = self._alive.numel()
        out = x.new_empty(x.shape[0], b * width)
        out[:, :n] = x[:, self._alive]
        out[:, n:].zero_()
        return out.reshape(x.shape[0], b, width)

    def _unpack_alive(self, x: Tensor) -> Tensor:
        """``[..., b, B]`` to the live coordinates' values ``[..., n_alive]``."""
        assert self._alive is not None
        return x.flatten(-2)[..., : self._alive.numel()]

    def _alive_columns(self, backend: StaticInverse | SlidingWindow, idx: Tensor) -> Tensor:
        """[F⁻¹]_pq for any pairs of ``idx`` ``[n, k]``.

        δ_pq/λ − ⟨Ŵ_:p, Ŵ_:q⟩ within a block of live weights, else δ_pq/λ (a dead coordinate,
        or two live ones in different blocks: F⁻¹ is block diagonal).
        """
        assert self._alive is not None and self._static is not None
        n, k = idx.shape
        width = self._static.scaled.shape[-1]
        slot = torch.full((self.d,), -1, dtype=torch.long, device=self.device)
        slot[self._alive] = torch.arange(self._alive.numel(), device=self.device)
        where = torch.where(idx >= 0, slot[idx.clamp_min(0)], -1).reshape(-1)  # [n·k]
        live = where >= 0
        safe = where.clamp_min(0)
        cols = backend.columns(safe // width, (safe % width)[:, None])  # [n·k, 1, m]
        cols = (cols.squeeze(1) * live[:, None].to(cols.dtype)).reshape(n, k, -1)
        block = torch.where(live, safe // width, -1).reshape(n, k)
        same = (block[:, :, None] == block[:, None, :]) & (block[:, :, None] >= 0)
        eye = torch.eye(k, dtype=self.dtype, device=self.device)
        return eye / self.config.damping - (cols @ cols.mT) * same.to(cols.dtype)

    @property
    def block_layout(self) -> BlockLayout:
        """The blocks as contiguous ranges of [0, d).

        ``"alive"``, once the estimate is frozen: block k runs from its first live weight to the
        next block's first (dead coordinates in between are decoupled, so they may belong to
        any block); it may cross parameters. Before that, and for ``"fixed"``: the core's.
        """
        if self._alive is None or self._static is None:
            return super().block_layout
        width = self._static.scaled.shape[-1]
        firsts = self._alive[::width].cpu()
        starts = torch.cat([torch.zeros(1, dtype=torch.long), firsts[1:]])
        ends = torch.cat([starts[1:], torch.tensor([self.d])])
        lengths = ends - starts
        return BlockLayout(starts, lengths, int(lengths.max()), self.d)

    # -- layout -------------------------------------------------------------------------------
    def _single_block(self) -> bool:
        assert self._blocks is not None
        return self._blocks.n_blocks == 1 and self._blocks.width == self.d

    def _pack(self, x: Tensor) -> Tensor:
        """``[n, d]`` to ``[n, b, W]`` (a view when unblocked)."""
        assert self._blocks is not None
        if self._single_block():
            return x.unsqueeze(-2)
        return self._blocks.pack(x)

    def _unpack(self, x: Tensor) -> Tensor:
        """``[n, b, W]`` to ``[n, d]``, or ``[b, W]`` to ``[d]`` (a view when unblocked)."""
        assert self._blocks is not None
        if self._single_block():
            return x.squeeze(-2)
        return self._blocks.unpack(x)


def _refuse_non_finite(grads: Tensor) -> None:
    """Raise :class:`NumericalError` naming the rows of ``grads`` that hold NaN or Inf."""
    finite = torch.isfinite(grads).all(dim=1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().squeeze(1)[:5].tolist()
        raise NumericalError(
            f"mfac.update: gradient rows {bad} (of {grads.shape[0]} in this chunk) hold NaN "
            "or Inf; the estimate is unchanged"
        )


def _as_mfac(config: EstimatorConfig) -> MFACConfig:
    if not isinstance(config, MFACConfig):
        raise ConfigError(f"mfac needs an MFACConfig, got {type(config).__name__}")
    return config
