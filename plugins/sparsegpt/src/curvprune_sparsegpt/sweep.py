"""SparseGPT: the column sweep with lazy batched updates (Frantar & Alistarh, ICML 2023).

Notation: W ``[rows, d]``, H̃ the damped layer Hessian, ``H̃⁻¹ = UᵀU`` with U upper triangular
(:func:`curvprune_sparsegpt.hessian.inverse_factor`). Columns are visited left to right (paper,
Algorithm 1). When column j is reached, the columns < j are frozen and the inverse Hessian of the
remaining columns j…d−1 has first row ``U_jj·U_{j,j:}`` (SparseGPT §3.2: the whole sequence of
inverse Hessians is read off one Cholesky factor). For every row at once:

* the OBS error of pruning ``w_j`` is ``err_j = (w_j − q_j) / U_jj`` with ``q_j = 0`` when the
  weight is pruned and ``q_j = w_j`` when it is kept (Algorithm 1, line "E_{:,j−i} ← …");
* the optimal compensation of the later columns is ``W_{:,j+1:} −= err_j · U_{j,j+1:}``, the
  OBS update ``δw = −w_q·H⁻¹e_q/[H⁻¹]_qq`` (OBC Eq. 3 / SparseGPT Eq. 3) restricted to the
  remaining columns;
* the loss of that step is ``err_j²/2 = w_j²/(2[(H̃_{j:,j:})⁻¹]_jj)`` (OBS saliency), so the
  sum over the sweep equals ``½·tr(ΔW·H̃·ΔWᵀ)`` of the final result exactly.

**Lazy batch updates** (§3.2): within a block of ``blocksize`` columns (B = 128) the updates are
applied column by column to the block only, and to the columns right of the block once, as one
GEMM ``W_{:,i2:} −= Err·U_{i1:i2, i2:}``; this is the same arithmetic reordered.

**Adaptive mask selection** (§3.3, "adaptive mask selection"): when the sweep reaches the start
of a mask block of ``mask_block`` columns (B_s, default = ``blocksize`` as in the reference), the
block's mask is chosen from the *current* (already updated) weights by the OBS saliency
``w²/U_jj²`` (``[(H̃_{j:,j:})⁻¹]_jj = U_jj²``). ``scope="layer"`` (the reference) prunes the
lowest saliencies over all rows and the block's columns together, ``scope="row"`` the same count
in every row. Counts are cumulative, ``floor(s·n·end) − floor(s·n·start)``, so the layer (or each
row) ends with exactly ``floor(s·n)`` pruned weights. **N:M** (§3.3, "semi-structured"): when the
sweep reaches a group of m columns, each row prunes the n lowest saliencies of that group (the
lazy block is rounded up to a multiple of m so that a group is never split).

A mask given by the caller (``mask``, True = keep) replaces the selection: SparseGPT then only
computes the compensating update, e.g. for a mask decided by the core's mask appliers.

Note (measured, see the tests): the sequential update is *not* guaranteed to lower the layer error
below that of simply zeroing the same weights. Compensation pushed into a column that is pruned
later is lost, and kept columns are frozen before later columns are pruned; on random problems
a few percent of (mask, H) pairs end above the no-update error. OBC-exact (:mod:`.obc`), whose
result is the joint optimum for its final mask, never does.

Dead inputs (H_jj = 0) are pruned and set to zero in addition to the selected mask (as the
reference zeroes them); they are pruned first when a block or group is selected.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvprune_sparsegpt.hessian import InverseFactor, LayerHessian, inverse_factor
from curvprune_sparsegpt.masks import (
    PruneResult,
    Scope,
    check_nm,
    nm_mask,
    prune_count,
    smallest_mask,
)


def as_factor(hessian: Tensor | LayerHessian | InverseFactor, percdamp: float,
              dtype: torch.dtype | None = None) -> InverseFactor:
    """Make an :class:`InverseFactor` from a raw H, a :class:`LayerHessian` or a factor."""
    if isinstance(hessian, InverseFactor):
        return hessian
    if isinstance(hessian, LayerHessian):
        if hessian.num_samples == 0:
            return hessian.factor(percdamp=percdamp)  # raises the clear error
        hessian = hessian.hessian
    return inverse_factor(hessian, percdamp=percdamp, dtype=dtype)


def _modes(sparsity: float | None, prune_n: int, mask: Tensor | None) -> None:
    given = sum(x for x in (sparsity is not None, bool(prune_n), mask is not None))
    if given != 1:
        raise ValueError("give exactly one of sparsity, prune_n/prune_m (N:M) or mask")


def _boundaries(d: int, *steps: int) -> list[int]:
    cuts = {d}
    for step in steps:
        cuts.update(range(0, d, step))
    return sorted(cuts)


@torch.no_grad()
def sparsegpt(weight: Tensor, hessian: Tensor | LayerHessian | InverseFactor, *,
              sparsity: float | None = None, prune_n: int = 0, prune_m: int = 0,
              mask: Tensor | None = None, blocksize: int = 128, mask_block: int | None = None,
              scope: Scope = "layer", percdamp: float = 0.01,
              dtype: torch.dtype | None = None, prior: Tensor | None = None) -> PruneResult:
    """Prune ``weight`` (``[rows, d]``) with SparseGPT and compensate the remaining weights.

    ``hessian``: the undamped layer Hessian ``[d, d]`` (damped here with ``percdamp``), a
    :class:`LayerHessian`, or an :class:`InverseFactor` computed once and reused. Exactly one of
    ``sparsity`` (unstructured, selected adaptively per ``mask_block`` with ``scope``), N:M
    (``prune_n``, ``prune_m``) or ``mask`` (bool keep mask ``[rows, d]``) says what to prune.
    The sweep runs in the factor's dtype (float32 for a float32 Hessian, the reference's
    precision; ``dtype=torch.float64`` for a float64 factorization of a raw H). ``prior``
    (bool keep mask ``[rows, d]``): weights pruned before, which stay pruned; they are chosen
    first (saliency −∞) and count towards ``sparsity`` and N:M.

    Returns :class:`PruneResult`: the updated weight (input dtype, exact zeros where pruned), the
    keep mask and the per-row loss ``Σ_j err_j²/2 = ½·Δwᵀ·H̃·Δw``.
    Cost: O(d³) for the factor, O(rows·d²) for the sweep; memory O(d² + rows·d).
    """
    _modes(sparsity, prune_n, mask)
    if blocksize <= 0 or (mask_block is not None and mask_block <= 0):
        raise ValueError("blocksize and mask_block must be positive")
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
    factor = as_factor(hessian, percdamp, dtype)
    upper = factor.upper
    rows, d = weight.shape
    if upper.shape[0] != d:
        raise ValueError(f"weight has {d} columns, the Hessian is {upper.shape[0]}×"
                         f"{upper.shape[0]}")
    dev, ftype = upper.device, upper.dtype
    w = weight.detach().to(device=dev, dtype=ftype, copy=True)
    dead = factor.dead.to(dev)
    w[:, dead] = 0
    alive = ~dead
    diag2 = upper.diagonal().square()
    ninf = torch.tensor(float("-inf"), dtype=ftype, device=dev)

    nm = bool(prune_n)
    select = sparsity is not None
    if mask is not None:
        if mask.shape != weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape "
                             f"{tuple(weight.shape)}")
        keep = mask.to(device=dev, dtype=torch.bool) & alive
    else:
        keep = alive.expand(rows, d).clone()
    if prior is not None:
        if prior.shape != weight.shape:
            raise ValueError(f"prior shape {tuple(prior.shape)} != weight shape "
                             f"{tuple(weight.shape)}")
        keep &= prior.to(device=dev, dtype=torch.bool)
        w[~keep] = 0
    if nm:
        check_nm(d, prune_n, prune_m)
    if select:
        prune_count(1, sparsity)  # validates the range
    mb = mask_block or blocksize
    if nm:  # an N:M group is chosen from the in-block updated weights: never split a group
        blocksize = -(-blocksize // prune_m) * prune_m
    cuts = _boundaries(d, blocksize, *([mb] if select else []))

    loss = torch.zeros(rows, dtype=ftype, device=dev)
    for i1, i2 in zip(cuts[:-1], cuts[1:], strict=True):
        if select and i1 % mb == 0:
            end = min(i1 + mb, d)
            scores = torch.where(keep[:, i1:end], w[:, i1:end].square() / diag2[i1:end], ninf)
            if scope == "layer":
                count = prune_count(rows * end, sparsity) - prune_count(rows * i1, sparsity)
            else:
                count = prune_count(end, sparsity) - prune_count(i1, sparsity)
            keep[:, i1:end] &= ~smallest_mask(scores, count, scope)
        block = w[:, i1:i2].clone()
        u_block = upper[i1:i2, i1:i2]
        err = torch.zeros_like(block)
        for i in range(i2 - i1):
            col = i1 + i
            if nm and col % prune_m == 0:
                scores = torch.where(keep[:, col:col + prune_m],
                                     block[:, i:i + prune_m].square() / diag2[col:col + prune_m],
                                     ninf)
                keep[:, col:col + prune_m] &= ~nm_mask(scores, prune_n, prune_m)
            e = torch.where(keep[:, col], 0.0, block[:, i]) / u_block[i, i]
            err[:, i] = e
            block[:, i + 1:].addr_(e, u_block[i, i + 1:], alpha=-1.0)
        w[:, i1:i2] = block * keep[:, i1:i2]
        loss += err.square().sum(1) * 0.5
        if i2 < d:
            w[:, i2:].addmm_(err, upper[i1:i2, i2:], alpha=-1.0)
    return PruneResult(w.to(weight.dtype), keep, loss)
