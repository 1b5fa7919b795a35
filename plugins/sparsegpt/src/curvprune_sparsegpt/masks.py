"""Mask selection shared by the layer-wise methods, the result type and the layer error.

Conventions (all methods of this package):

* a weight matrix is ``[rows, columns]`` (rows = output features, columns = the layer's input
  features, ``d_in``); a *keep mask* has the same shape, ``True`` where a weight survives;
* ``sparsity`` s prunes ``prune_count(n, s) = floor(s·n)`` of a comparison group of n weights
  (a tiny tolerance absorbs round-off such as ``0.29·100 = 28.999…``);
* N:M (``prune_n``, ``prune_m``) prunes exactly n of every m consecutive input columns of each row
  (2:4 keeps 2 of 4), so ``columns`` must be a multiple of m;
* scores are "smaller = pruned first"; ``-inf`` forces a weight into the pruned set.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Scope = Literal["row", "layer"]


class PruneResult(NamedTuple):
    """What every pruning routine of this package returns.

    ``weight``: the pruned (and, for OBS methods, updated) ``[rows, columns]`` matrix, in the
    input's dtype, exactly zero where ``mask`` is False. ``mask``: the keep mask (bool).
    ``loss``: ``[rows]`` loss estimate per row (None where the method has none, e.g. WANDA);
    for SparseGPT and OBC it is the OBS estimate ``½·Δwᵀ·H̃·Δw`` with the damped Hessian H̃, which
    for H = 2XXᵀ/n is ``‖Δw·X‖²/n`` plus the damping term ``½λ‖Δw‖²``.
    """

    weight: Tensor
    mask: Tensor
    loss: Tensor | None


def prune_count(n: int, sparsity: float) -> int:
    """``floor(sparsity·n)``, robust to binary round-off (the count of weights pruned of n)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return min(n, math.floor(sparsity * n + 1e-9))


def check_nm(columns: int, prune_n: int, prune_m: int) -> None:
    """Raise ValueError unless ``0 < n ≤ m`` and m divides ``columns``."""
    if prune_m <= 0 or not 0 < prune_n <= prune_m:
        raise ValueError(f"N:M needs 0 < prune_n <= prune_m, got {prune_n}:{prune_m}")
    if columns % prune_m:
        raise ValueError(f"N:M with m = {prune_m} needs the column count ({columns}) to be a "
                         f"multiple of m")


def smallest_mask(scores: Tensor, counts: int, scope: Scope) -> Tensor:
    """Prune mask (True = pruned) of the ``counts`` smallest scores per row or over the matrix.

    ``scores`` is ``[rows, c]``; ``scope="row"`` prunes ``counts`` in every row,
    ``scope="layer"`` prunes ``counts`` over all entries together. Ties are broken by position
    (``torch.sort(stable=True)``), so the result is deterministic.
    """
    pruned = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if counts <= 0:
        return pruned
    if scope == "row":
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :counts]
        return pruned.scatter_(1, idx, True)
    if scope == "layer":
        idx = torch.sort(scores.reshape(-1), stable=True).indices[:counts]
        return pruned.reshape(-1).scatter_(0, idx, True).reshape(scores.shape)
    raise ValueError(f"scope must be 'row' or 'layer', got {scope!r}")


def nm_mask(scores: Tensor, prune_n: int, prune_m: int) -> Tensor:
    """Prune mask (True = pruned): the n smallest of every m consecutive columns of each row."""
    rows, cols = scores.shape
    check_nm(cols, prune_n, prune_m)
    groups = scores.reshape(rows, cols // prune_m, prune_m)
    idx = torch.sort(groups, dim=2, stable=True).indices[..., :prune_n]
    pruned = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return pruned.scatter_(2, idx, True).reshape(rows, cols)


def score_mask(scores: Tensor, *, sparsity: float | None = None, prune_n: int = 0,
               prune_m: int = 0, scope: Scope = "row") -> Tensor:
    """Keep mask from scores: unstructured at ``sparsity`` (per row or per layer) or N:M."""
    if prune_n:
        return ~nm_mask(scores, prune_n, prune_m)
    if sparsity is None:
        raise ValueError("give sparsity or prune_n/prune_m")
    n = scores.shape[1] if scope == "row" else scores.numel()
    return ~smallest_mask(scores, prune_count(n, sparsity), scope)


def layer_error(weight: Tensor, pruned: Tensor, hessian: Tensor) -> Tensor:
    """``tr((W − Ŵ)·H·(W − Ŵ)ᵀ)`` in float64 (for H = 2XXᵀ/n: ``2‖WX − ŴX‖²_F / n``).

    The layer-reconstruction error used to compare methods; pass the undamped H.
    """
    delta = (weight.to(torch.float64) - pruned.to(torch.float64))
    return torch.einsum("ri,ij,rj->", delta, hessian.to(torch.float64), delta)
