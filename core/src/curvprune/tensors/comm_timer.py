"""How long this process has spent in curvprune's collectives (the per-rank report's
"communication"): :func:`collective` times a collective helper of
:mod:`curvprune.tensors.distributed`, :func:`communication_seconds` reads the total.

On NCCL, where collectives are asynchronous, the time counts their launches and the waits the
backend imposes, not the transfers that overlap later work.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["collective", "communication_seconds"]

F = TypeVar("F", bound=Callable[..., Any])

#: [seconds so far, nesting depth]: a collective calling another is counted once
_STATE = [0.0, 0]


def collective(fn: F) -> F:
    """Count ``fn``'s wall time in :func:`communication_seconds` (once when nested)."""

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if _STATE[1]:
            return fn(*args, **kwargs)
        _STATE[1] = 1
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _STATE[0] += time.perf_counter() - started
            _STATE[1] = 0

    return timed  # type: ignore[return-value]


def communication_seconds() -> float:
    """Wall seconds spent in curvprune's collectives by this process so far."""
    return float(_STATE[0])
