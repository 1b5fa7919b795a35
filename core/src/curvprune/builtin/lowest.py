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
contiguous groups (layers), with per-layer quotas: one bisection for all layers at once.

Every step is a count, so the same selection runs on a vector split over torch.distributed
ranks in contiguous pieces (each rank scores its own columns of a sharded estimator): the
counts are summed over the ranks (one all-reduce of one count per layer per bisection step),
the keys' range is a min/max over the ranks, and ties at the threshold go to the lower
positions, i.e. to the lower ranks first (one all-gather of the per-layer tie counts). The
result is the one process's selection, bit for bit (:class:`AcrossRanks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from curvprune.tensors import distributed

__all__ = ["AcrossRanks", "InOneProcess", "lowest_k", "order_keys", "prune_lowest_in_runs"]

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


class InOneProcess:
    """How per-run counts over the pieces of a vector combine: here, the whole vector."""

    def sum_(self, counts: Tensor) -> Tensor:
        return counts

    def min_(self, keys: Tensor) -> Tensor:
        return keys

    def max_(self, keys: Tensor) -> Tensor:
        return keys

    def before(self, counts: Tensor) -> Tensor:
        """The sum of ``counts`` over the ranks before this one (of lower positions)."""
        return torch.zeros_like(counts)


class AcrossRanks(InOneProcess):
    """The vector is split over the torch.distributed ranks, rank r holding the r-th
    contiguous piece; every rank calls the selection alike (each call is a collective)."""

    def sum_(self, counts: Tensor) -> Tensor:
        return distributed.all_reduce_(counts, "sum")

    def min_(self, keys: Tensor) -> Tensor:
        return distributed.all_reduce_(keys, "min")

    def max_(self, keys: Tensor) -> Tensor:
        return distributed.all_reduce_(keys, "max")

    def before(self, counts: Tensor) -> Tensor:
        every = distributed.all_gather_stack(counts)  # [W, runs]
        return every[: distributed.rank()].sum(0)


def _lowest_in_pieces(
    values: Tensor,
    candidates: Tensor,
    pieces: Sequence[int],
    runs: Sequence[int],
    k: Tensor,
    ranks: InOneProcess,
) -> Tensor:
    """Bool ``[n]``: in every run r, the ``k[r]`` lowest ``values`` among its candidates.

    ``values`` and ``candidates`` hold consecutive pieces of the runs (lengths ``pieces``, the
    i-th in run ``runs[i]``, at most one piece per run here); the other pieces live on other
    ranks (``ranks``). All runs bisect together: one count per run per step.
    """
    keys = order_keys(values)
    itype = keys.dtype
    top, bottom = torch.iinfo(itype).max, torch.iinfo(itype).min
    keys.masked_fill_(~candidates, top)  # finite floats never reach the sentinel
    device, n_runs = values.device, int(k.numel())
    at = torch.tensor(list(runs), dtype=torch.long, device=device)
    key_pieces, candidate_pieces = keys.split(list(pieces)), candidates.split(list(pieces))

    def per_run(local: list[Tensor], fill: int) -> Tensor:
        out = torch.full((n_runs,), fill, dtype=torch.long, device=device)
        if local:
            out[at] = torch.stack(local).long()
        return out

    total = ranks.sum_(per_run([torch.count_nonzero(c) for c in candidate_pieces], 0))
    k = torch.minimum(k.to(device).long(), total)
    # per run, the smallest t with #(keys ≤ t) ≥ k, in int64 arithmetic over [min − 1, max]
    lo = ranks.min_(per_run([p.amin() for p in key_pieces], top)) - 1
    hi = ranks.max_(per_run([torch.where(c, p, bottom).amax()
                             for p, c in zip(key_pieces, candidate_pieces, strict=True)], bottom))
    hi = torch.where(total > 0, hi, lo)
    for _ in range(8 * keys.element_size() + 1):
        mid = (lo & hi) + ((lo ^ hi) >> 1)  # ⌊(lo + hi)/2⌋ without int64 overflow
        at_most = mid[at].to(itype)
        enough = ranks.sum_(per_run([torch.count_nonzero(p <= t) for p, t in
                                     zip(key_pieces, at_most, strict=True)], 0)) >= k
        hi = torch.where(enough, mid, hi)
        lo = torch.where(enough, lo, mid)
    threshold = hi[at].to(itype)
    out = torch.empty_like(candidates)
    out_pieces = out.split(list(pieces))
    for i, t in enumerate(threshold):
        torch.lt(key_pieces[i], t, out=out_pieces[i])
    below = ranks.sum_(per_run([torch.count_nonzero(o) for o in out_pieces], 0))
    equals = [p == t for p, t in zip(key_pieces, threshold, strict=True)]
    del keys, key_pieces  # not alive beside the ties' running counts
    equal_counts = per_run([torch.count_nonzero(e) for e in equals], 0)
    # of the keys equal to t the lowest positions: those of the ranks before this one first
    need = (k - below - ranks.before(equal_counts)).clamp_min(0)[at]
    for equal, o, wanted in zip(equals, out_pieces, need, strict=True):
        count_type = torch.int32 if equal.numel() < 2**31 else torch.int64
        equal &= torch.cumsum(equal, 0, dtype=count_type) <= wanted
        o |= equal
    out &= candidates
    return out


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
    if values.numel() == 0:
        return candidates.clone()
    k = torch.as_tensor(k, device=values.device).long().reshape(1)
    return _lowest_in_pieces(values, candidates, [values.numel()], [0], k, InOneProcess())


def _pieces(sizes: Sequence[int], lo: int, hi: int) -> tuple[list[int], list[int]]:
    """The lengths of the runs' pieces within ``[lo, hi)`` and their run indices."""
    lengths, runs, start = [], [], 0
    for index, size in enumerate(sizes):
        a, b = max(start, lo), min(start + int(size), hi)
        if a < b:
            lengths.append(b - a)
            runs.append(index)
        start += int(size)
    return lengths, runs


def prune_lowest_in_runs(
    scores: Tensor,
    alive: Tensor,
    sizes: Sequence[int],
    quota: Tensor,
    total: Tensor | None = None,
    *,
    columns: tuple[int, int] | None = None,
    ranks: InOneProcess | None = None,
) -> Tensor:
    """:func:`curvprune.builtin.selection.prune_lowest` for groups that are contiguous runs.

    Args:
        scores: ``[n]`` saliencies; only alive entries are read.
        alive: bool ``[n]``, the units not removed yet.
        sizes: the runs' lengths (the layers of the flat layout), summing to the whole length.
        quota: long ``[len(sizes)]`` >= 0, how many more units each run may lose.
        total: how many to remove in all, the globally lowest among the units the quotas
            allow (each run's ``quota`` lowest alive); None: exactly ``quota`` from each run.
        columns: ``scores`` and ``alive`` are the positions ``[lo, hi)`` of the whole vector,
            the rest on the other ranks of ``ranks`` (default: all of it, in one process).
        ranks: how counts combine (:class:`AcrossRanks` under torch.distributed).

    Returns:
        bool ``[n]``, the new alive units (a subset of ``alive``): the same as the sort-based
        ``prune_lowest`` with each run as a group (in one process, over all positions).
    """
    ranks = ranks or InOneProcess()
    lo, hi = columns if columns is not None else (0, int(scores.numel()))
    pieces, runs = _pieces(sizes, lo, hi)
    quota = quota.to(scores.device)
    taken = _lowest_in_pieces(scores, alive, pieces, runs, quota, ranks)
    if total is not None:  # the globally lowest of what the quotas allow: one run of all
        whole = torch.as_tensor(total, device=scores.device).long().reshape(1)
        mine = [0] if hi > lo else []
        taken = _lowest_in_pieces(scores, taken, [hi - lo] if mine else [], mine, whole, ranks)
    taken.logical_not_()
    taken &= alive
    return taken
