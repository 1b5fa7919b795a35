"""OBC-exact: row-wise greedy Optimal Brain Surgeon (Frantar & Alistarh, NeurIPS 2022).

"Optimal Brain Compression" (OBC), §4 ("ExactOBS"). Every row w of W is an independent problem
with the shared Hessian H̃. Keeping F (the weights not yet removed) and ``H_F⁻¹ = (H̃_FF)⁻¹``:

1. remove ``q = argmin_{q∈F} w_q² / [H_F⁻¹]_qq`` (OBS saliency; loss ``w_q²/(2[H_F⁻¹]_qq)``),
2. update the row by ``δw = −w_q · H_F⁻¹ e_q / [H_F⁻¹]_qq`` (OBC Eq. 3), so ``w_q`` becomes 0,
3. downdate ``H_F⁻¹ ← H_F⁻¹ − H_F⁻¹_{:,q} H_F⁻¹_{q,:} / [H_F⁻¹]_qq`` (OBC Eq. 4, Gaussian
   elimination of q): the inverse of H̃ restricted to F∖{q}, with row and column q zero,

until the row's target count. Each step is O(d²) per row; all rows of a chunk run together as
``[chunk, d, d]`` inverses (``row_chunk``, or sized from ``max_bytes``), cost O(rows·d³) overall.
Since every step is the exact OBS step for the current set, the final row is the optimal
reconstruction for its final mask (``min ½Δwᵀ H̃ Δw`` with the pruned weights at 0), and the
per-step losses sum to that minimum; in particular it is never worse than zeroing the same weights.

Sparsity:

* ``scope="row"``: every row removes ``floor(s·d)`` weights;
* ``scope="layer"`` (OBC's global selection within a layer, §4 "Global OBC" / the reference
  ``prune_unstr``): each row is first run to the end, recording the loss of each greedy step
  (its *loss trace*); the ``floor(s·rows·d)`` smallest per-step losses over all rows are chosen
  and every row removes as many weights as it has among them (then a second pass reproduces
  each row's state at that count instead of storing all d intermediate rows);
* N:M (``prune_n``, ``prune_m``; OBC §4 "N:M sparsity"): the greedy choice is restricted to the
  m-groups that still have fewer than n pruned weights, for ``d·n/m`` steps.

Dead inputs (H_jj = 0) start pruned (weight 0, which costs nothing) and count towards the target.
Ground truth for small layers (d ≲ a few hundred); computed in float64 by default.
"""

from __future__ import annotations

import torch
from torch import Tensor

from curvprune_sparsegpt.hessian import InverseFactor, LayerHessian, inverse_factor
from curvprune_sparsegpt.masks import PruneResult, Scope, check_nm, prune_count


def _inverse(hessian: Tensor | LayerHessian | InverseFactor, percdamp: float,
             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    if isinstance(hessian, InverseFactor):
        factor = hessian
    else:
        h = hessian.hessian if isinstance(hessian, LayerHessian) else hessian
        factor = inverse_factor(h, percdamp=percdamp, dtype=dtype)
    upper = factor.upper.to(dtype)
    return upper.t() @ upper, factor.dead


@torch.no_grad()
def _greedy(w: Tensor, hinv: Tensor, pruned: Tensor, steps: Tensor,
            groups: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``steps[r]`` greedy OBS removals on every row r of ``w`` (``[c, d]``), in place.

    ``hinv``: H̃⁻¹ ``[d, d]`` of the full problem; the rows' initially ``pruned`` weights (dead
    inputs, weight 0) are eliminated from each row's inverse first. Returns the rows, the
    pruned mask and the per-step losses ``[c, max(steps)]`` (0 past a row's count).
    """
    c, d = w.shape
    rng = torch.arange(c, device=w.device)
    inv = hinv.expand(c, d, d).clone()
    if bool(pruned.any()):  # eliminate the initially pruned (dead) coordinates: decoupled in H̃
        keep = (~pruned).to(w.dtype)
        inv.mul_(keep[:, :, None] * keep[:, None, :])
    total = int(steps.max()) if c else 0
    trace = torch.zeros(c, total, dtype=w.dtype, device=w.device)
    inf = torch.tensor(float("inf"), dtype=w.dtype, device=w.device)
    count = None
    if groups is not None:
        n, m = groups
        count = pruned.reshape(c, d // m, m).sum(2)
    for t in range(total):
        active = steps > t
        diag = inv.diagonal(dim1=1, dim2=2)
        blocked = pruned
        if count is not None:
            blocked = pruned | (count >= n).repeat_interleave(m, dim=1)
        scores = torch.where(blocked, inf, w.square() / torch.where(pruned, 1.0, diag))
        q = scores.argmin(1)
        dq = diag[rng, q]
        col = inv[rng, :, q]  # H_F⁻¹ e_q, [c, d]
        trace[:, t] = torch.where(active, scores[rng, q] * 0.5, 0.0)
        coef = torch.where(active, w[rng, q] / dq, 0.0)
        w.sub_(coef[:, None] * col)
        w[rng, q] = torch.where(active, 0.0, w[rng, q])
        pruned[rng, q] |= active
        if count is not None:
            count[rng, q // m] += active.to(count.dtype)
        scale = torch.where(active, -1.0 / dq, 0.0)
        inv.baddbmm_((col * scale[:, None])[:, :, None], col[:, None, :])
    w.masked_fill_(pruned, 0.0)
    return w, pruned, trace


def _chunk_rows(d: int, itemsize: int, row_chunk: int | None, max_bytes: int) -> int:
    if row_chunk is not None:
        if row_chunk <= 0:
            raise ValueError("row_chunk must be positive")
        return row_chunk
    return max(1, max_bytes // (2 * d * d * itemsize))


@torch.no_grad()
def obc(weight: Tensor, hessian: Tensor | LayerHessian | InverseFactor, *,
        sparsity: float | None = None, prune_n: int = 0, prune_m: int = 0,
        scope: Scope = "row", percdamp: float = 0.01, row_chunk: int | None = None,
        max_bytes: int = 256 * 2**20, dtype: torch.dtype = torch.float64) -> PruneResult:
    """Prune ``weight`` (``[rows, d]``) with OBC's exact greedy OBS, row by row (batched).

    ``hessian``: the undamped H ``[d, d]`` (damped with ``percdamp`` exactly as for SparseGPT,
    so both solve the same problem), a :class:`LayerHessian` or an :class:`InverseFactor`.
    Give ``sparsity`` (with ``scope`` "row" or "layer") or N:M. ``row_chunk`` rows share one
    ``[row_chunk, d, d]`` batch (default: as many as fit in ``max_bytes`` with the temporary).
    Returns :class:`PruneResult` with the per-row loss ``½·Δwᵀ·H̃·Δw``.
    """
    if (sparsity is None) == (not prune_n):
        raise ValueError("give exactly one of sparsity or prune_n/prune_m (N:M)")
    if scope not in ("row", "layer"):
        raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")
    hinv, dead = _inverse(hessian, percdamp, dtype)
    rows, d = weight.shape
    if hinv.shape[0] != d:
        raise ValueError(f"weight has {d} columns, the Hessian is {hinv.shape[0]}×"
                         f"{hinv.shape[0]}")
    dev = hinv.device
    w_all = weight.detach().to(device=dev, dtype=dtype, copy=True)
    dead = dead.to(dev)
    n_dead = int(dead.sum())
    groups = None
    if prune_n:
        check_nm(d, prune_n, prune_m)
        groups = (prune_n, prune_m)
        dead_per_group = dead.reshape(-1, prune_m).sum(1)
        per_row = int((prune_n - dead_per_group).clamp_min(0).sum())
    elif scope == "row":
        per_row = max(prune_count(d, sparsity) - n_dead, 0)
    else:
        per_row = d - n_dead  # first pass: full loss traces
    chunk = _chunk_rows(d, w_all.element_size(), row_chunk, max_bytes)

    def run(steps_all: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out_w = torch.empty_like(w_all)
        out_p = torch.empty(rows, d, dtype=torch.bool, device=dev)
        losses = []
        for r1 in range(0, rows, chunk):
            r2 = min(r1 + chunk, rows)
            pruned = dead.expand(r2 - r1, d).clone()
            w_c, p_c, tr = _greedy(w_all[r1:r2].clone(), hinv, pruned, steps_all[r1:r2], groups)
            out_w[r1:r2], out_p[r1:r2] = w_c, p_c
            losses.append(tr)
        width = max((t.shape[1] for t in losses), default=0)
        trace = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in losses])
        return out_w, out_p, trace

    steps = torch.full((rows,), per_row, dtype=torch.long, device=dev)
    w_out, pruned, trace = run(steps)
    if sparsity is not None and scope == "layer":
        budget = max(prune_count(rows * d, sparsity) - rows * n_dead, 0)
        order = torch.sort(trace.reshape(-1), stable=True).indices[:budget]
        steps = torch.bincount(torch.div(order, max(per_row, 1), rounding_mode="floor"),
                               minlength=rows)
        w_out, pruned, trace = run(steps)
    return PruneResult(w_out.to(weight.dtype), ~pruned, trace.sum(1))
