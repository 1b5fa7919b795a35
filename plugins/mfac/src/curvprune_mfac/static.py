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
"""

from __future__ import annotations

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
    m = gram.shape[-1]
    eye = torch.eye(m, dtype=torch.float64, device=gram.device)
    capacitance = gram.to(torch.float64) / damping + float(count) * eye
    factor, info = torch.linalg.cholesky_ex(capacitance)
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
        scaled: Ŵ = C⁻¹G/λ, ``[b, m, W]``; row i is the paper's vᵢ/√denᵢ.
        damping: λ.
    """

    def __init__(self, scaled: Tensor, damping: float) -> None:
        self.scaled = scaled
        self.damping = damping

    @classmethod
    def from_gradients_(cls, grads: Tensor, count: int, damping: float) -> StaticInverse:
        """Build the factors, overwriting ``grads`` with Ŵ (M-FAC Sec. 3.1, GEMM form).

        Args:
            grads: G, ``[b, m, W]``; rows beyond the real gradients must be zero (they then
                give zero rows of Ŵ). Overwritten in place.
            count: the m of the 1/m scaling (number of real gradients).
            damping: λ.

        Cost: O(b·m²·W) for the Gram matrix and for Ŵ, O(b·m³) for the m×m algebra.
        """
        gram = grads @ grads.mT
        factor = capacitance_cholesky(gram, count, damping)
        eye = torch.eye(factor.shape[-1], dtype=torch.float64, device=factor.device)
        coeff = torch.linalg.solve_triangular(factor, eye.expand_as(factor), upper=False)
        coeff = (coeff / damping).to(grads.dtype)  # C⁻¹/λ, lower triangular
        width = grads.shape[-1]
        for start in range(0, width, _COLUMN_CHUNK):  # loop over column chunks of d, not weights
            cols = grads[..., start : start + _COLUMN_CHUNK]
            cols.copy_(coeff @ cols)
        return cls(grads, damping)

    def ihvp(self, x: Tensor) -> Tensor:
        """F⁻¹x = x/λ − Ŵᵀ(Ŵx) for ``x`` ``[n, b, W]``: two passes over Ŵ, O(n·m·d)."""
        xt = x.permute(1, 2, 0)  # [b, W, n]
        back = self.scaled.mT @ (self.scaled @ xt)  # [b, W, n]
        return x / self.damping - back.permute(2, 0, 1)

    def diagonal(self) -> Tensor:
        """[F⁻¹]_qq = 1/λ − Σᵢ Ŵ_iq², ``[b, W]``: O(m) per entry, O(d·m) in all."""
        norms = torch.linalg.vector_norm(self.scaled, dim=-2)
        return 1.0 / self.damping - norms.square()

    def columns(self, block: Tensor, position: Tensor) -> Tensor:
        """Ŵ's columns at ``position`` ``[n, k]`` of blocks ``block`` ``[n]``, as ``[n, k, m]``.

        [F⁻¹]_pq = δ_pq/λ − ⟨Ŵ_:p, Ŵ_:q⟩, so each entry of F⁻¹ costs O(m).
        """
        return self.scaled.mT[block[:, None], position]
