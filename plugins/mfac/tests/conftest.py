"""Dense float64 ground truth for the mfac tests, written from the definitions (no plugin code).

Tolerances: a backward-stable solve or factorization in float64 has error ≲ c·n·eps·cond(F)
relative to ‖F⁻¹‖₂·‖v‖₂ (Higham, Accuracy and Stability, Thm. 10.4 / 7.2), with n = d + m the
sizes of the two factorizations involved here (Woodbury: an m×m Cholesky and d-long dot
products). M-FAC evaluates F⁻¹v = v/λ − (low-rank correction), two terms of size ‖v‖/λ that
cancel down to ‖F⁻¹v‖, so the amplification is κ = max(cond(F), λ_max(F)/λ) (equal when d > m).
The tests use ``tol(F, m, λ) = 8·(d + m)·eps·κ`` and compare norm-wise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvprune import BlockLayout
from curvprune.testing.dense import damped_fisher

EPS64 = torch.finfo(torch.float64).eps


def block_ids(sizes: tuple[int, ...], block_size: int | None) -> Tensor:
    """The block of every flat coordinate, ``[d]`` (the core's block partition)."""
    return BlockLayout.build(sizes, block_size).block_of()


def dense_fisher(grads: Tensor, sizes: tuple[int, ...], block_size: int | None,
                 damping: float, scale: int | None = None) -> Tensor:
    """F = λI + (1/s)·Σ ggᵀ (s = m unless given) on the blocks, float64 (the kit's ground truth)."""
    g = grads.to(torch.float64)
    if scale is not None:  # (1/s)Σggᵀ = (1/m)Σ(√(m/s)g)(√(m/s)g)ᵀ
        g = g * (g.shape[0] / scale) ** 0.5
    return damped_fisher(g, sizes, block_size, damping)


def tol(fisher: Tensor, m: int, damping: float) -> float:
    """8·(d + m)·eps·max(cond(F), λ_max(F)/λ): the norm-wise float64 budget above."""
    eig = torch.linalg.eigvalsh(fisher)
    kappa = max(float(eig[-1] / eig[0]), float(eig[-1]) / damping)
    return 8 * (fisher.shape[0] + m) * EPS64 * kappa


def normwise_error(actual: Tensor, expected: Tensor, inverse: Tensor, v: Tensor) -> float:
    """max |a − e| / (‖F⁻¹‖₂·‖v‖₂), row by row."""
    scale = torch.linalg.matrix_norm(inverse, ord=2) * torch.linalg.vector_norm(
        v.reshape(-1, v.shape[-1]).to(torch.float64), dim=-1, keepdim=True)
    diff = (actual.to(torch.float64) - expected).reshape(scale.shape[0], -1).abs()
    return float((diff / scale).max())
