"""Where each rank's time and memory go in a distributed pruning step (the per-rank report).

A step has two phases on every rank: **collect** (per-sample gradients, their exchange or
reduction, and the estimator's accumulation) and **answer** (the estimator's factorisation and
queries, scoring, the mask and the update). Each phase's wall time is split into

* ``communication``: time inside curvprune's collectives
  (:func:`curvprune.distributed.communication_seconds`);
* ``curvature``: time inside the estimator (its updates while collecting; its queries while
  answering when it is sharded, where the wrapper times them; an unsharded estimator's queries
  count as scoring);
* the rest: ``gradients`` (collect) and ``scoring`` (answer).

The peak memory of each phase is the process's high-water mark over it: on CUDA
``max_memory_allocated`` (reset at the phase's start), on Linux CPUs the resident set's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which counts the
interpreter and the allocator's cached pages as well. Elsewhere it is None.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from curvprune.tensors import distributed

__all__ = ["RankMeter", "phase_peak_bytes", "reset_phase_peak"]

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_phase_peak(device: torch.device) -> bool:
    """Start a new high-water mark; False where none can be measured."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        _CLEAR_REFS.write_text("5")  # "5": reset the peak resident set size (Linux ≥ 4.0)
    except OSError:
        return False
    return True


def phase_peak_bytes(device: torch.device) -> int | None:
    """The high-water mark since :func:`reset_phase_peak` (None where unmeasurable)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RankMeter:
    """Times and peaks of one step's phases on this rank; :meth:`gather` collects all ranks'.

    Args:
        device: where the step runs (CUDA peaks or the CPU resident set).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values: dict[str, float | int | None] = {}

    @contextlib.contextmanager
    def phase(self, name: str, rest: str) -> Iterator[dict[str, float]]:
        """Measure phase ``name``; the body adds its estimator seconds to ``["curvature"]``.

        A phase entered again (once per stage of a sequential step) adds its seconds to the
        earlier ones and keeps the highest peak.

        Args:
            name: ``"collect"`` or ``"answer"``.
            rest: what the time left after communication and curvature is called.
        """
        inside = {"curvature": 0.0}
        measured = reset_phase_peak(self.device)
        comm = distributed.communication_seconds()
        started = time.perf_counter()
        try:
            yield inside
        finally:
            wall = time.perf_counter() - started
            comm = distributed.communication_seconds() - comm
            curvature = inside["curvature"]
            self.values[rest] = float(self.values.get(rest) or 0.0) + max(
                0.0, wall - comm - curvature)
            self.values["communication"] = float(self.values.get("communication", 0.0)) + comm
            self.values["curvature"] = float(self.values.get("curvature", 0.0)) + curvature
            peak = phase_peak_bytes(self.device) if measured else None
            before = self.values.get(f"{name}_peak_bytes")
            if before is not None and peak is not None:
                peak = max(int(before), peak)
            self.values[f"{name}_peak_bytes"] = peak

    def gather(self) -> list[dict[str, Any]]:
        """Every rank's values, in rank order (collective; this rank's alone in one process)."""
        mine = {"rank": distributed.rank(), **self.values}
        if not distributed.is_distributed():
            return [mine]
        every: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(every, mine)
        return every
