"""Which rank sweeps which layer: a deterministic assignment balanced by the sweeps' cost.

Under torch.distributed the ``sparsegpt`` estimator gives every layer of a fit (one stage under
sequential calibration, else the whole model) one owner rank, which alone keeps the layer's
Hessian, factors it and runs its sweep (:mod:`curvprune_sparsegpt.estimator`). Every rank
computes the assignment from the layers' shapes alone, so it must be deterministic.

The cost of one layer ``W [rows, d]`` is the flop count of its work, up to constants:

* ``"sparsegpt"``: the factorization of H̃ (a Cholesky and a triangular inverse, O(d³)) and the
  column sweep, which updates the remaining columns of every row (O(rows·d²); SparseGPT §3.2):
  ``rows·d² + d³``;
* ``"exact"`` (OBC): d greedy steps per row, each an O(d²) downdate of the row's inverse
  (OBC §4): ``rows·d³``.

:func:`balanced_owners` places them by Graham's greedy *longest processing time first* rule
("Bounds on multiprocessing timing anomalies", SIAM J. Appl. Math. 17, 1969): layers in order
of decreasing cost (ties: lower index first), each onto the rank with the least cost so far
(ties: lower rank). The busiest rank's last layer went to the least loaded rank of that moment,
whose load can only have grown since, so ``max load ≤ min load + largest single cost``; the
makespan is within 4/3 of the optimum.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

__all__ = ["balanced_owners", "sweep_costs"]


def sweep_costs(shapes: Iterable[tuple[int, int]], algorithm: str) -> list[float]:
    """The relative cost of each layer ``(rows, d)`` under ``algorithm`` (module docstring)."""
    if algorithm not in ("sparsegpt", "exact"):
        raise ValueError(f"algorithm must be 'sparsegpt' or 'exact', got {algorithm!r}")
    if algorithm == "exact":
        return [float(rows) * float(d) ** 3 for rows, d in shapes]
    return [float(rows) * float(d) ** 2 + float(d) ** 3 for rows, d in shapes]


def balanced_owners(costs: Sequence[float], parts: int) -> list[int]:
    """The owner in ``range(parts)`` of each item of ``costs``, by greedy LPT (module docstring).

    With more parts than items, the parts left over own nothing.

    Raises:
        ValueError: ``parts < 1``, or a cost that is negative or not finite.
    """
    if parts < 1:
        raise ValueError(f"balanced_owners: parts must be at least 1, got {parts}")
    values = [float(c) for c in costs]
    bad = next((c for c in values if not (math.isfinite(c) and c >= 0)), None)
    if bad is not None:
        raise ValueError(f"balanced_owners: costs must be finite and non-negative, got {bad}")
    owners = [0] * len(values)
    loads = [(0.0, r) for r in range(parts)]  # a heap: the least loaded rank first, then by rank
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + values[i], r))
    return owners
