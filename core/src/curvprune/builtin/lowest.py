"""The k lowest scores without sorting: memory O(n) bytes, not O(n) int64 indices.

Removing the k lowest-scored of n weights is usually done with a sort, which on PyTorch
allocates the sorted values and int64 indices (12 bytes per weight) and, for ranks within
layers, several more int64 permutations: about 100 bytes per weight in all, measured
(docs/benchmarks.md, plan accuracy). For a global mask over a BERT (d = 85 M) that is 8 GB
beside the curvature state. This module finds the same k weights by bisection on the scores'
order-preserving integer keys instead:

* every float maps to an integer of the same width whose signed order is the float order
  (non-negative floats keep their bits; negative ones flip the magnitude bits; −0.0 is made
  +0.0 first, so equal floats have equal keys);
* the k-th lowest key t is found by bisection over the integer range, each step one
  comparison and count over the candidates (32 steps for float32, 64 for float64), all on the
  device: no host sync, no sort;
* the keys below t are taken, and of those equal to t the lowest positions, so ties break by
  position exactly as a stable sort would.

The peak is the keys (one integer per score) and a few boolean or int32 temporaries, about
10 bytes per float32 score. :func:`prune_lowest_in_runs` applies it to the builtin appliers'
contiguous groups (layers), with per-layer quotas, one layer at a time where a quota binds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["lowest_k", "order_keys", "prune_lowest_in_runs"]

_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64,
           torch.float16: torch.int16, torch.bfloat16: torch.int16}


def order_keys(values: Tensor) -> Tensor:
    """Integers ``[n]`` whose signed order is the order of the finite floats ``values``.

    Equal floats (−0.0 and +0.0 included) get equal keys.
    """
    if values.dtype not in _INT_OF:
        raise TypeError(f"order_keys: floating scores expected, got {values.dtype}")
    itype = _INT_OF[values.dtype]
    bits = (values + 0.0).view(itype)  # x + 0.0 turns −0.0 into +0.0 (a new tensor)
    magnitude = torch.iinfo(itype).max
    # negative floats: larger magnitude must give a smaller key; flip all but the sign bit
    return torch.where(bits < 0, bits ^ magnitude, bits, out=bits)


def lowest_k(values: Tensor, candidates: Tensor, k: Tensor | int) -> Tensor:
    """Bool ``[n]``: the ``k`` lowest ``values`` among ``candidates`` (ties: lower position).

    Args:
        values: ``[n]`` finite floats (at the candidates).
        candidates: bool ``[n]``.
        k: how many to take (0-dim long tensor or int); more than the candidates takes them all.

    Returns:
        A subset of ``candidates`` with ``min(k, candidates.sum())`` entries: the same as the
        first k candidates of a stable sort by value.
    """
    keys = order_keys(values)
    itype = keys.dtype
    top = torch.iinfo(itype).max
    keys.masked_fill_(~candidates, top)  # finite floats never reach the sentinel
    k = torch.as_tensor(k, device=values.device).long().clamp_max(int(candidates.numel()))
    total = torch.count_nonzero(candidates)
    k = torch.minimum(k, total)
    # smallest t with #(keys ≤ t) ≥ k, in int64 arithmetic over [min key − 1, max key]
    lo = keys.amin().long() - 1  # #(keys ≤ lo) = 0 < k unless k = 0
    hi = torch.where(total > 0, torch.where(candidates, keys, torch.iinfo(itype).min)
                     .amax().long(), lo)
    for _ in range(8 * keys.element_size() + 1):
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # ⌊(lo + hi)/2⌋ without int64 overflow
        enough = torch.count_nonzero(keys <= mid.to(itype)) >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid)
    threshold = hi.to(itype)
    below = keys < threshold
    need = k - torch.count_nonzero(below)  # how many of the keys equal to t, lowest positions first
    equal = keys == threshold
    del keys
    count_type = torch.int32 if equal.numel() < 2**31 else torch.int64
    equal &= torch.cumsum(equal, 0, dtype=count_type) <= need
    below |= equal
    below &= candidates
    return below


def prune_lowest_in_runs(
    scores: Tensor,
    alive: Tensor,
    sizes: Sequence[int],
    quota: Tensor,
    total: Tensor | None = None,
) -> Tensor:
    """:func:`curvprune.builtin.selection.prune_lowest` for groups that are contiguous runs.

    Args:
        scores: ``[n]`` saliencies; only alive entries are read.
        alive: bool ``[n]``, the units not removed yet.
        sizes: the runs' lengths (the layers of the flat layout), summing to n.
        quota: long ``[len(sizes)]`` >= 0, how many more units each run may lose.
        total: how many to remove in all, the globally lowest among the units the quotas
            allow (each run's ``quota`` lowest alive); None: exactly ``quota`` from each run.

    Returns:
        bool ``[n]``, the new alive units (a subset of ``alive``): the same as the sort-based
        ``prune_lowest`` with each run as a group.
    """
    runs = list(zip(scores.split(list(sizes)), alive.split(list(sizes)), strict=True))
    counts = torch.stack([torch.count_nonzero(a) for _, a in runs]) if runs else quota
    binding = (quota < counts).tolist()  # one host sync: which runs' quotas cut
    if total is None:
        out = alive.clone()
        for (s, a), piece, cut, q in zip(runs, out.split(list(sizes)), binding, quota,
                                         strict=True):
            if cut:
                piece &= ~lowest_k(s, a, q)
            else:  # the quota covers every alive unit of the run
                piece.fill_(False)
        return out
    allowed = alive.clone()
    for (s, a), piece, cut, q in zip(runs, allowed.split(list(sizes)), binding, quota,
                                     strict=True):
        if cut:
            piece.copy_(lowest_k(s, a, q))
    taken = lowest_k(scores, allowed, total)
    del allowed
    return alive & ~taken
