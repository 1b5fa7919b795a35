"""SOSP-I's selection: greedy minimisation of the quadratic model over the removed set.

Minimising ΔL(M) = Σ_{s∈M} qₛ + ½·Σ_{s,s'∈M} Q_{ss'} over sets of a given size is a binary
quadratic program (NP-hard). SOSP-I picks structures one at a time (memo §4.3): starting from
M = ∅, add

    s* = argmin_{s∉M} [ qₛ + ½·Qₛₛ + Σ_{s'∈M} Q_{ss'} ],

the exact increase ΔL(M ∪ {s}) − ΔL(M) of the model (Q symmetric). The running sums
Σ_{s'∈M} Q_{ss'} are updated with one column of Q per step, so a step is O(S) vector work with
no loop over structures and no host synchronisation; k steps cost O(k·S).

Unlike SOSP-H, the interaction term ranges only over the structures actually removed.
"""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

__all__ = ["GreedyResult", "greedy_order", "order_scores"]


@attrs.frozen
class GreedyResult:
    """The greedy picks, in order.

    Attributes:
        order: long ``[k]``, the structures in the order they were added (k ≤ the count asked
            for when quotas or candidates ran out).
        marginal: ``[k]``, the model's loss increase of each pick given the earlier ones.

    """

    order: Tensor
    marginal: Tensor

    @property
    def predicted(self) -> Tensor:
        """ΔL(M) of the first i picks, ``[k]`` (the cumulative sum of ``marginal``)."""
        return torch.cumsum(self.marginal, 0)


def greedy_order(
    q: Tensor,
    matrix: Tensor,
    count: int,
    *,
    candidates: Tensor | None = None,
    group: Tensor | None = None,
    quota: Tensor | None = None,
) -> GreedyResult:
    """Greedily pick ``count`` structures minimising Σ_M qₛ + ½·Σ_{M×M} Q.

    Args:
        q: first-order terms, ``[S]``.
        matrix: Q, symmetric ``[S, S]``.
        count: how many structures to pick.
        candidates: bool ``[S]``, the structures that may be picked (default: all).
        group: long ``[S]``, the group of each structure (needed with ``quota``).
        quota: long ``[n_groups]``, the most structures each group may lose.

    Returns:
        The picks (fewer than ``count`` if the candidates or quotas run out).

    """
    size = q.numel()
    dtype = torch.promote_types(q.dtype, matrix.dtype)
    q, matrix = q.to(dtype), matrix.to(dtype)
    device = q.device
    available = torch.ones(size, dtype=torch.bool, device=device)
    if candidates is not None:
        available &= candidates.to(device)
    if quota is not None:
        if group is None:
            raise ValueError("greedy_order: quota needs group")
        left = quota.to(device).clone()
        group = group.to(device)
        available &= left[group] > 0
    count = min(int(count), size)
    base = q + 0.5 * torch.diagonal(matrix)
    running = torch.zeros(size, dtype=dtype, device=device)
    order = torch.empty(count, dtype=torch.long, device=device)
    marginal = torch.empty(count, dtype=dtype, device=device)
    inf = torch.tensor(torch.inf, dtype=dtype, device=device)
    for step in range(count):
        cost = torch.where(available, base + running, inf)
        pick = torch.argmin(cost)
        order[step] = pick
        marginal[step] = cost[pick]
        running += matrix[:, pick]
        available[pick] = False
        if quota is not None:
            left[group[pick]] -= 1
            available &= left[group] > 0
    valid = torch.isfinite(marginal)  # an infinite cost means nothing was left to pick
    return GreedyResult(order[valid], marginal[valid])


def order_scores(order: Tensor, size: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Scores ``[size]`` under which an ascending ranking reproduces ``order`` first.

    The i-th pick scores i; every structure not picked scores ``size`` (after all picks).
    """
    scores = torch.full((size,), float(size), dtype=dtype, device=order.device)
    scores[order] = torch.arange(order.numel(), dtype=dtype, device=order.device)
    return scores
