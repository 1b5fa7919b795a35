"""Builtin plugin ``builtin.dense``: the exact blockwise damped-Fisher estimator ``dense``.

F = λ·I + (1/m)·Σᵢ gᵢgᵢᵀ formed explicitly per block and inverted by Cholesky: O(d·B) memory,
meant for small d (tests, tiny models, references). :mod:`curvprune.testing.dense` re-exports
it next to the float64 ground truths it is checked against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import Tensor

from curvprune.errors import NumericalError
from curvprune.plugin.manager import hookimpl
from curvprune.plugin.registry import Register
from curvprune.roles.estimator import CurvatureEstimator, EstimatorConfig
from curvprune.tensors.distributed import all_reduce_sum_
from curvprune.tensors.layout import BlockLayout, ParamLayout

__all__ = ["DenseConfig", "DenseEstimator"]


# --------------------------------------------------------------------------------------------
# The exact estimator
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class DenseConfig(EstimatorConfig):
    """Options of the ``dense`` estimator: those of :class:`curvprune.EstimatorConfig`.

    ``block_size`` None (the default) keeps one block over all selected weights: the exact
    damped empirical Fisher, d² numbers. Meant for small d (tests, ground truth, tiny models).
    """


class DenseEstimator(CurvatureEstimator):
    """The exact damped empirical-Fisher inverse, blockwise, by batched Cholesky.

    Accumulates the Gram matrix Σᵢ gᵢgᵢᵀ of each diagonal block as one padded
    ``[n_blocks, W, W]`` tensor (via :meth:`curvprune.BlockLayout.pack`). On the first query
    after an update it forms F_b = λ·I + G_b/m, factors F_b = L_bL_bᵀ and keeps
    F_b⁻¹ = L_b⁻ᵀL_b⁻¹ (triangular solves and a GEMM, robust to thread contention in batched
    LAPACK); updates invalidate that cache. Padding slots have G = 0, so they hold λ on the
    diagonal of F_b and decouple from the real coordinates.

    Memory: 2·n_blocks·W² numbers held (Gram and inverse), W the padded block width, and 3 at
    the peak while inverting (Gram, factor and its inverse).

    Under torch.distributed it sums (``reduction = "sum"``): each rank accumulates the Gram
    blocks of its own gradients and :meth:`all_reduce` adds them up.
    """

    config: DenseConfig
    reduction = "sum"

    def __init__(self, config: DenseConfig | None = None) -> None:
        super().__init__(config or DenseConfig())
        self._blocks: BlockLayout | None = None
        self._gram: Tensor | None = None
        self._inverse: Tensor | None = None
        self._m = 0

    @property
    def sharding(self) -> Literal["separable", "coupled"] | None:  # type: ignore[override]
        """``"separable"`` when blocked (blocks never cross a parameter, so a run of whole
        blocks is estimated exactly on its own columns); None for one block over all weights."""
        return "separable" if self.config.block_size is not None else None

    # -- state --------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """m: gradients accumulated since :meth:`setup`."""
        return self._m

    @classmethod
    def memory_bytes(cls, sizes: Sequence[int], config: EstimatorConfig) -> int:
        """Peak bytes: the padded Gram blocks and two more batches while inverting
        (3·n_blocks·W²·itemsize; the Gram and the inverse, 2·n_blocks·W², are held after)."""
        blocks = BlockLayout.build(sizes, config.block_size)
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return 3 * blocks.n_blocks * blocks.width**2 * itemsize

    @classmethod
    def plan_held_bytes(cls, layout: ParamLayout, config: EstimatorConfig) -> int:
        """The Gram batch, held while gradients stream in."""
        blocks = BlockLayout.build(layout.sizes, config.block_size)
        itemsize = torch.empty((), dtype=config.torch_dtype).element_size()
        return blocks.n_blocks * blocks.width**2 * itemsize

    @classmethod
    def estimated_flops(cls, sizes: Sequence[int], config: EstimatorConfig) -> float | None:
        """num_grads·Σ W² for the Gram updates plus n_blocks·W³ for the factorizations."""
        blocks = BlockLayout.build(sizes, config.block_size)
        return float(
            2 * config.num_grads * blocks.n_blocks * blocks.width**2
            + 2 * blocks.n_blocks * blocks.width**3
        )

    def _setup(self) -> None:
        self._blocks = BlockLayout.build(self.sizes, self.config.block_size)
        n, w = self._blocks.n_blocks, self._blocks.width
        self._gram = torch.zeros(n, w, w, device=self.device, dtype=self.dtype)
        self._inverse = None
        self._m = 0

    def _update(self, grads: Tensor) -> None:
        assert self._blocks is not None and self._gram is not None
        packed = self._blocks.pack(grads).transpose(0, 1)  # [n_blocks, k, W]
        self._gram.baddbmm_(packed.mT, packed)  # G_b += Σᵢ g_{i,b} g_{i,b}ᵀ
        self._m += grads.shape[0]
        self._inverse = None

    def _all_reduce(self) -> None:
        assert self._gram is not None
        all_reduce_sum_(self._gram)
        count = torch.tensor([self._m], dtype=torch.int64, device=self.device)
        self._m = int(all_reduce_sum_(count))
        self._inverse = None

    # -- queries ------------------------------------------------------------------------------
    def block_inverses(self) -> Tensor:
        """F_b⁻¹ for every block, ``[n_blocks, W, W]`` (padding rows/columns hold 1/λ·I)."""
        if self._inverse is None:
            if self._gram is None:
                raise RuntimeError("DenseEstimator: call setup(sizes) before querying")
            n, w = self._gram.shape[:2]
            eye = torch.eye(w, device=self.device, dtype=self.dtype)
            # Beside the Gram batch, at most two more batches live at any time (memory_bytes):
            # each intermediate is released as soon as the next exists.
            fisher = self._gram / max(self._m, 1)
            fisher += self.config.damping * eye
            chol, info = torch.linalg.cholesky_ex(fisher)
            del fisher
            if bool(info.any()):
                raise NumericalError(
                    f"dense estimator: the damped Fisher of block {int(info.nonzero()[0])} is not "
                    "positive definite (non-finite gradients?); check the gradients or raise "
                    "damping"
                )
            chol_inv = torch.linalg.solve_triangular(chol, eye.expand(n, w, w), upper=False)
            del chol
            inverse = chol_inv.mT @ chol_inv
            del chol_inv
            # A blocked GEMM may sum (i, j) and (j, i) in different orders; averaging with the
            # transpose makes the ground truth exactly symmetric (float addition commutes).
            symmetric = inverse + inverse.mT
            del inverse
            self._inverse = symmetric.mul_(0.5)
        return self._inverse

    def _ihvp(self, v: Tensor) -> Tensor:
        assert self._blocks is not None
        packed = self._blocks.pack(v).transpose(0, 1)  # [n_blocks, n, W]
        out = packed @ self.block_inverses()  # F_b⁻¹ is symmetric: (F_b⁻¹ v_b)ᵀ = v_bᵀ F_b⁻¹
        return self._blocks.unpack(out.transpose(0, 1))

    def _inverse_diagonal(self) -> Tensor:
        assert self._blocks is not None
        return self._blocks.unpack(self.block_inverses().diagonal(dim1=-2, dim2=-1))

    def _inverse_columns(self, idx: Tensor) -> Tensor:
        """Entries of F⁻¹ among each row's indices, gathered from the block inverses.

        Args:
            idx: long ``[n, k]``, each row's valid entries in one block; ``-1`` pads.

        Returns:
            ``[n, k, k]``; rows and columns of padding hold the identity.

        Raises:
            ValueError: a row mixes indices of two blocks.
        """
        assert self._blocks is not None
        valid = idx >= 0
        block_of = self._blocks.block_of(self.device)
        block = torch.where(valid, block_of[idx.clamp_min(0)], -1)
        row_block = block.max(dim=1).values  # the block of each row (-1: all padding)
        if bool((valid & (block != row_block[:, None])).any()):
            raise ValueError(
                "inverse_columns: each row of idx must hold indices of one block "
                f"(block_size={self.config.block_size}); got rows spanning blocks"
            )
        row_block = row_block.clamp_min(0)
        pos = torch.where(valid, idx - self._blocks.starts.to(self.device)[row_block, None], 0)
        out = self.block_inverses()[row_block[:, None, None], pos[:, :, None], pos[:, None, :]]
        k = idx.shape[1]
        eye = torch.eye(k, device=self.device, dtype=self.dtype)
        return torch.where(valid[:, :, None] & valid[:, None, :], out, eye)


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register ``dense``."""
    register("dense", DenseEstimator, config=DenseConfig)
