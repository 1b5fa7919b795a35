"""WANDA (Sun, Liu, Bair & Kolter, ICLR 2024) and the magnitude baseline.

WANDA ("Pruning by Weights and activations", §3, Eq. 1) scores every weight by
``S_ij = |W_ij| · ‖X_j‖₂``, ‖X_j‖₂ the norm of input feature j over all N calibration vectors,
compares the scores **per output row** (the paper's comparison group, §3 "Comparison group") and
prunes the lowest; there is no weight update. N:M prunes the n lowest of each m consecutive
inputs of a row (§4, "structured N:M").

The norms here come from the same statistics as the Hessian: with ``H = (2/N)·Σ xxᵀ``,
``‖X_j‖₂ = sqrt(N·H_jj/2)`` (:meth:`LayerHessian.column_norms`), so one calibration pass serves
all methods. Any positive multiple of the norms gives the same masks; a bare ``[d]`` tensor of
norms is accepted too. Dead inputs have norm 0 and are pruned first.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvprune_sparsegpt.hessian import LayerHessian
from curvprune_sparsegpt.masks import PruneResult, Scope, score_mask


def wanda_scores(weight: Tensor, norms: Tensor | LayerHessian) -> Tensor:
    """``|W_ij|·‖X_j‖₂`` (``[rows, d]``), in float32 at least."""
    if isinstance(norms, LayerHessian):
        norms = norms.column_norms()
    if norms.shape != (weight.shape[1],):
        raise ValueError(f"need {weight.shape[1]} column norms, got {tuple(norms.shape)}")
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return weight.detach().to(dtype).abs() * norms.to(device=weight.device, dtype=dtype)


@torch.no_grad()
def wanda(weight: Tensor, norms: Tensor | LayerHessian, *, sparsity: float | None = None,
          prune_n: int = 0, prune_m: int = 0, scope: Scope = "row") -> PruneResult:
    """Prune ``weight`` ``[rows, d]`` by WANDA scores; per output row unless ``scope="layer"``.

    Returns :class:`PruneResult` with the masked weight, the keep mask and ``loss=None``.
    """
    keep = score_mask(wanda_scores(weight, norms), sparsity=sparsity, prune_n=prune_n,
                      prune_m=prune_m, scope=scope)
    return PruneResult(weight.detach() * keep, keep, None)


@torch.no_grad()
def magnitude(weight: Tensor, *, sparsity: float | None = None, prune_n: int = 0,
              prune_m: int = 0, scope: Scope = "layer") -> PruneResult:
    """Prune the smallest ``|W_ij|`` (magnitude baseline; per layer by default), no update."""
    keep = score_mask(weight.detach().abs(), sparsity=sparsity, prune_n=prune_n,
                      prune_m=prune_m, scope=scope)
    return PruneResult(weight.detach() * keep, keep, None)
