"""The static M-FAC algorithm: F⁻¹ for a fixed set of m gradients, never materialized.

Frantar, Kurtic & Alistarh (NeurIPS 2021), Sec. 3.1. With F = λI + (1/m)·Σᵢ gᵢgᵢᵀ and the
Sherman–Morrison recursion F₀⁻¹ = I/λ, Fᵢ⁻¹ = Fᵢ₋₁⁻¹ − vᵢvᵢᵀ/denᵢ, vᵢ = Fᵢ₋₁⁻¹gᵢ,
denᵢ = m + gᵢᵀvᵢ, the paper stores V = [v₁ … v_m] and den and answers

    F⁻¹x = x/λ − Σᵢ vᵢ (vᵢᵀx)/denᵢ           (IHVP, O(d·m))
    [F⁻¹]_qq = 1/λ − Σᵢ V_iq²/denᵢ           (one diagonal entry, O(m))

This module computes the same factors in GEMM form. Let G be the m×d gradient matrix,
A = m·I + GGᵀ/λ (SPD, eigenvalues ≥ m) and A = CCᵀ its Cholesky factor. Woodbury gives

    F⁻¹ = I/λ − Gᵀ A⁻¹ G / λ² = I/λ − ŴᵀŴ,    Ŵ = C⁻¹G/λ,

and row i of Ŵ is exactly vᵢ/√denᵢ: the Cholesky elimination of A performs the recursion above,
one gradient per row (the pivot-free LU of the paper's implementation is A = (C·diag(C)⁻¹)·
(diag(C)·Cᵀ), so denᵢ = C_ii²). So one Gram GEMM (O(d·m²)), one m×m Cholesky and triangular
inverse (O(m³), in float64 however small λ is), and one m×m by m×d GEMM (O(d·m²)) replace the m
sequential passes of the recursion. Ŵ overwrites G, so the state is m·d numbers.

Everything is batched over independent diagonal blocks: gradients are ``[b, m, W]`` (b blocks of
padded width W; the unblocked algorithm is b = 1, W = d). Padding columns hold zero gradients,
so they keep [F⁻¹]_qq = 1/λ and never couple to real coordinates.

**Sharded by columns** (unblocked, over torch.distributed ranks; rank s holds the columns G_s):
GGᵀ = Σ_s G_sGₛᵀ is one all-reduce of an m×m matrix, after which every rank has the same C;
Ŵ_s = C⁻¹G_s/λ is local; F⁻¹x restricted to rank s's columns is x_s/λ − Ŵₛᵀ(Σ_r Ŵ_r x_r), one
all-reduce of the m-vector Ŵx per product; [F⁻¹]_qq and entries within a shard are local. The
``reduce`` argument is that all-reduce (the identity in one process).

**Storage in half precision** (``storage_dtype``): G and Ŵ may be held in bfloat16/float16;
every product reads them in column pieces converted to the compute dtype, so only the stored
values are rounded (measured in docs/benchmarks.md), never the accumulations.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from curvprune import NumericalError

__all__ = ["StaticInverse", "capacitance_cholesky"]

#: Columns of Ŵ computed per GEMM when overwriting G in place (bounds the m×chunk workspace).
_COLUMN_CHUNK = 1 << 14


def capacitance_cholesky(gram: Tensor, count: int | float, damping: float) -> Tensor:
    """Lower Cholesky factor C of A = count·I + K/λ, batched ``[b, m, m]``, in float64.

    Args:
        gram: K = GGᵀ, ``[b, m, m]`` (only the lower triangle is read).
        count: the m of the 1/m scaling of F (the number of gradients the estimate averages).
        damping: λ > 0.

    Returns:
        C with A = CCᵀ, float64 ``[b, m, m]``. A's eigenvalues are ≥ count > 0, so the
        factorization exists for any finite K; it is done in float64 because A's condition
        number, up to 1 + ‖G‖²/(count·λ), grows as λ shrinks (M-FAC memo §4.3).
    """
    capacitance = gram.to(torch.float64, copy=True)  # built in place: one m×m batch at a time
    capacitance.div_(damping).diagonal(dim1=-2, dim2=-1).add_(float(count))
    factor, info = torch.linalg.cholesky_ex(capacitance)
    del capacitance
    if bool(info.any()):
        # Exact arithmetic cannot get here (A ≥ count·I), but K = GGᵀ accumulated in float32
        # has eigenvalue errors ~eps₃₂·‖K‖, which K/λ amplifies past count when λ is tiny.
        raise NumericalError(
            f"mfac: the m×m capacitance m·I + GGᵀ/λ lost definiteness (damping={damping:g} is too "
            f"small for gradients with ‖GGᵀ‖ ≈ {float(gram.abs().amax()):.3g} in float32); raise "
            "[estimator] damping or use dtype = 'float64'"
        )
    return factor


class StaticInverse:
    """F⁻¹ = I/λ − ŴᵀŴ for a fixed set of gradients, per block.

    Attributes:
        scaled: Ŵ = C⁻¹G/λ, ``[b, m, W]``; row i is the paper's vᵢ/√denᵢ (in the storage dtype).
        damping: λ.
        dtype: the compute dtype (that of the products' inputs and outputs).
        reduce: sums a partial sum over the column shards (identity unless sharded).
    """

    def __init__(
        self,
        scaled: Tensor,
        damping: float,
        dtype: torch.dtype | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.scaled = scaled
        self.damping = damping
        self.dtype = dtype or scaled.dtype
        self.reduce = reduce or _identity

    @classmethod
    def from_gradients_(
        cls,
        grads: Tensor,
        count: int,
        damping: float,
        *,
        dtype: torch.dtype | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> StaticInverse:
        """Build the factors, overwriting ``grads`` with Ŵ (M-FAC Sec. 3.1, GEMM form).

        Args:
            grads: G, ``[b, m, W]``; rows beyond the real gradients must be zero (they then
                give zero rows of Ŵ). Overwritten in place.
            count: the m of the 1/m scaling (number of real gradients).
            damping: λ.
            dtype: the compute dtype (default: ``grads``'); ``grads`` may be stored lower.
            reduce: all-reduce of the partial Gram matrix over column shards.

        Cost: O(b·m²·W) for the Gram matrix and for Ŵ, O(b·m³) for the m×m algebra.
        """
        dtype = dtype or grads.dtype
        reduce = reduce or _identity
        width = grads.shape[-1]
        if grads.dtype == dtype:
            gram = grads @ grads.mT
        else:  # stored low: accumulate the Gram matrix from pieces read in the compute dtype
            m = grads.shape[-2]
            gram = torch.zeros(*grads.shape[:-2], m, m, dtype=dtype, device=grads.device)
            for start in range(0, width, _COLUMN_CHUNK):
                cols = grads[..., start : start + _COLUMN_CHUNK].to(dtype)
                gram += cols @ cols.mT
        gram = reduce(gram)
        factor = capacitance_cholesky(gram, count, damping)
        del gram  # the m×m batches are the algorithm's peak beside G: hold as few as possible
        eye = torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
        coeff = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
        del factor
        coeff = coeff.div_(damping).to(dtype)  # C⁻¹/λ, lower triangular
        for start in range(0, width, _COLUMN_CHUNK):  # loop over column chunks of d, not weights
            cols = grads[..., start : start + _COLUMN_CHUNK]
            cols.copy_(coeff @ cols.to(dtype))
        return cls(grads, damping, dtype, reduce)

    def ihvp(self, x: Tensor) -> Tensor:
        """F⁻¹x = x/λ − Ŵᵀ(Ŵx) for ``x`` ``[n, b, W]``: two passes over Ŵ, O(n·m·d)."""
        xt = x.permute(1, 2, 0)  # [b, W, n]
        if self.scaled.dtype == self.dtype:
            back = self.scaled.mT @ self.reduce(self.scaled @ xt)  # [b, W, n]
            return x / self.damping - back.permute(2, 0, 1)
        width = self.scaled.shape[-1]
        projected = None
        for start in range(0, width, _COLUMN_CHUNK):
            piece = self.scaled[..., start : start + _COLUMN_CHUNK].to(self.dtype)
            part = piece @ xt[..., start : start + _COLUMN_CHUNK, :]
            projected = part if projected is None else projected + part
        assert projected is not None
        projected = self.reduce(projected)  # Ŵx, [b, m, n]
        out = x / self.damping
        for start in range(0, width, _COLUMN_CHUNK):
            piece = self.scaled[..., start : start + _COLUMN_CHUNK].to(self.dtype)
            out[..., start : start + _COLUMN_CHUNK] -= (piece.mT @ projected).permute(2, 0, 1)
        return out

    def diagonal(self) -> Tensor:
        """[F⁻¹]_qq = 1/λ − Σᵢ Ŵ_iq², ``[b, W]``: O(m) per entry, O(d·m) in all."""
        if self.scaled.dtype == self.dtype:
            norms = torch.linalg.vector_norm(self.scaled, dim=-2)
        else:
            width = self.scaled.shape[-1]
            norms = torch.cat([
                torch.linalg.vector_norm(
                    self.scaled[..., start : start + _COLUMN_CHUNK].to(self.dtype), dim=-2
                )
                for start in range(0, width, _COLUMN_CHUNK)
            ], dim=-1)
        return 1.0 / self.damping - norms.square()

    def columns(self, block: Tensor, position: Tensor) -> Tensor:
        """Ŵ's columns at ``position`` ``[n, k]`` of blocks ``block`` ``[n]``, as ``[n, k, m]``.

        [F⁻¹]_pq = δ_pq/λ − ⟨Ŵ_:p, Ŵ_:q⟩, so each entry of F⁻¹ costs O(m).
        """
        return self.scaled.mT[block[:, None], position].to(self.dtype)


def _identity(tensor: Tensor) -> Tensor:
    return tensor
