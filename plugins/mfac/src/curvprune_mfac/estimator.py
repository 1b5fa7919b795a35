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

import torch
from torch import Tensor

from curvprune import (
    BlockLayout,
    ConfigError,
    CurvatureEstimator,
    EstimatorConfig,
    EstimatorStateError,
    NumericalError,
)
from curvprune_mfac.config import MFACConfig
from curvprune_mfac.dynamic import DIAGONAL_PIECES, SlidingWindow
from curvprune_mfac.static import StaticInverse

__all__ = ["MFACEstimator"]


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

    # -- sizes --------------------------------------------------------------------------------
    @staticmethod
    def _shape(sizes: Sequence[int], config: MFACConfig) -> tuple[int, int, int]:
        """(b, m, W): blocks, gradient rows stored, padded block width."""
        blocks = BlockLayout.build(sizes, config.block_size)
        rows = config.num_grads if config.algorithm == "static" else config.window_size
        return blocks.n_blocks, rows, blocks.width

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """b·m·W·itemsize for G (Ŵ overwrites it) + 3·b·m²·8 for K, C and C⁻¹ (float64).

        ``dynamic`` adds the piece of Ŵ its diagonal query forms at a time (1/8 of G).
        """
        cfg = _as_mfac(config)
        b, m, width = cls._shape(sizes, cfg)
        itemsize = torch.empty((), dtype=cfg.torch_dtype).element_size()
        total = b * m * width * itemsize + 3 * b * m * m * 8
        if cfg.algorithm == "dynamic":
            total += b * m * -(-width // DIAGONAL_PIECES) * itemsize
        return total

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """static: 4·m²·b·W (Gram and Ŵ GEMMs) + b·m³; dynamic: 2·num_grads·m·b·W + b·m³/3."""
        cfg = _as_mfac(config)
        b, m, width = cls._shape(sizes, cfg)
        if cfg.algorithm == "static":
            return float(4 * m * m * b * width + b * m**3)
        return float(2 * cfg.num_grads * m * b * width + b * m**3 / 3)

    # -- life cycle ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """m: gradients in the estimate (static: all fed; dynamic: those in the window)."""
        return self._window.count if self._window is not None else self._count

    def _setup(self) -> None:
        self._blocks = BlockLayout.build(self.sizes, self.config.block_size)
        b, m, width = self._shape(self.sizes, self.config)
        self._static, self._window, self._grads, self._count = None, None, None, 0
        if self.config.algorithm == "static":
            self._grads = torch.zeros(b, m, width, dtype=self.dtype, device=self.device)
        else:
            self._window = SlidingWindow(b, m, width, damping=self.config.damping,
                                         dtype=self.dtype, device=self.device)

    def _update(self, grads: Tensor) -> None:
        finite = torch.isfinite(grads).all(dim=1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().squeeze(1)[:5].tolist()
            raise NumericalError(
                f"mfac.update: gradient rows {bad} (of {grads.shape[0]} in this chunk) hold NaN "
                "or Inf; the estimate is unchanged"
            )
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
        if self.num_samples == 0:
            raise EstimatorStateError(
                "mfac has no gradients yet: call setup(sizes) and update([k, d] gradients) "
                "before querying the inverse"
            )
        if self._window is not None:
            return self._window
        if self._static is None:
            assert self._grads is not None
            grads = self._grads[:, : self._count]
            self._static = StaticInverse.from_gradients_(grads, self._count,
                                                         self.config.damping)
            self._grads = None  # Ŵ lives in the same storage
        return self._static

    def _ihvp(self, v: Tensor) -> Tensor:
        backend = self._backend()
        # Scale each row by a power of two near its largest entry (exact in binary floating
        # point): v/λ and the correction then stay clear of underflow and overflow whatever the
        # scale of v (F⁻¹ is linear, so the scale is put back exactly).
        amax = v.abs().amax(dim=1, keepdim=True)
        scale = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax))), 1.0)
        return self._unpack(backend.ihvp(self._pack(v / scale))) * scale

    def _inverse_diagonal(self) -> Tensor:
        return self._unpack(self._backend().diagonal())

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """[F⁻¹]_pq = δ_pq/λ − ⟨Ŵ_:p, Ŵ_:q⟩ for each row's pairs: O(n·k²·m), no IHVP.

        Args:
            idx: long ``[n, k]``, each row's indices in one block, ``-1`` padding (the base class
                puts the identity there).

        Returns:
            ``[n, k, k]``.
        """
        backend = self._backend()
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


def _as_mfac(config: EstimatorConfig) -> MFACConfig:
    if not isinstance(config, MFACConfig):
        raise ConfigError(f"mfac needs an MFACConfig, got {type(config).__name__}")
    return config
