"""What curvprune's collectives cost and how they fail.

* :func:`collective` times a collective helper of :mod:`curvprune.tensors.distributed`;
  :func:`communication_seconds` reads the total (the per-rank report's "communication"). On
  NCCL, where collectives are asynchronous, it counts their launches and the waits the backend
  imposes, not transfers that overlap later work.
* :func:`lost_peer` turns the backend's error when another rank died mid-collective (gloo's
  "Connection reset by peer", NCCL's aborted communicator, a store timeout) into one line that
  names the rank(s) gone, found through the rendezvous store: every survivor writes a key and
  waits a moment for the others' keys.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from curvprune.errors import RankLostError

__all__ = ["collective", "communication_seconds", "lost_peer"]

F = TypeVar("F", bound=Callable[..., Any])

#: [seconds so far, nesting depth]: a collective calling another is counted once
_STATE = [0.0, 0]

#: fragments of the backends' messages when a peer process is gone
_PEER_GONE = (
    "Connection reset by peer", "Connection closed by peer", "Broken pipe", "Socket Timeout",
    "NCCL communicator was aborted", "ProcessGroupNCCL", "Connection refused", "timed out",
    "Timed out", "DistNetworkError", "recvValue failed", "sendBytes failed",
)
#: seconds the survivors wait for each other's keys in the store
_ROLL_CALL_SECONDS = 3.0


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


def lost_peer(exc: BaseException, *, resume_hint: str = "") -> RankLostError | None:
    """A one-line :class:`~curvprune.errors.RankLostError` if a peer rank is gone, else None.

    Args:
        exc: an exception raised inside a collective.
        resume_hint: how to resume, appended to the message.
    """
    dist = torch.distributed
    if isinstance(exc, RankLostError):  # already named (deeper down): add the hint only
        return RankLostError(f"{exc}; {resume_hint}") if resume_hint else exc
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = f"{type(exc).__name__}: {exc}"
    if not isinstance(exc, (RuntimeError, OSError)) or not any(k in text for k in _PEER_GONE):
        return None
    gone = _roll_call(dist.get_rank(), dist.get_world_size())
    if gone is None:
        who = "rank 0 or the launcher (the rendezvous store is unreachable)"
    elif gone:
        who = "rank " + ", ".join(map(str, gone))
    else:
        who = "another rank"
    reason = next(k for k in _PEER_GONE if k in text)
    return RankLostError(
        f"{who} stopped responding in a collective ({reason})"
        + (f"; {resume_hint}" if resume_hint else "")
    )


def _roll_call(me: int, world: int) -> list[int] | None:
    """Ranks that did not answer the roll call in the store (None: no store reachable)."""
    try:
        store = torch.distributed.distributed_c10d._get_default_store()
        prefix = "curvprune/alive/"
        store.set(f"{prefix}{me}", "1")
        deadline = time.monotonic() + _ROLL_CALL_SECONDS
        while True:
            answered = [r for r in range(world) if store.check([f"{prefix}{r}"])]
            if len(answered) == world or time.monotonic() > deadline:
                return [r for r in range(world) if r not in answered]
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - no store (rank 0 hosted it and is gone)
        return None
