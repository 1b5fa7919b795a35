"""Measure the memory torch allocates, on CPU as on CUDA, to check ``plan`` against reality.

Two measures:

* :func:`peak_allocated`: the peak of bytes held by torch tensors while a function runs, above
  what was held when it started. On CUDA this is ``torch.cuda.max_memory_allocated``. On CPU torch
  keeps no allocator statistics and neither ``tracemalloc`` (which sees only Python's allocator)
  nor the process RSS (which includes the interpreter, freed-but-cached pages and the allocator's
  slack) isolates tensor memory, so the function runs under ``torch.profiler`` with
  ``profile_memory=True``: every allocation and free is attributed to an operator, and the running
  sum of these, in time order, peaks where tensor memory peaks. The resolution is one operator:
  a workspace allocated and freed inside a single operator (a LAPACK buffer) is not seen.
* :func:`tensor_bytes`: the bytes of the distinct tensor storages reachable from an object's
  attributes (what an estimator holds between calls).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["peak_allocated", "profiling", "tensor_bytes"]

T = TypeVar("T")


def peak_allocated(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()``; return its result and the peak tensor bytes it added on ``device``.

    The peak is measured above the bytes allocated when ``fn`` starts, so tensors that exist
    before (inputs) are not counted; tensors ``fn`` frees that existed before can make the
    running sum dip below zero, and the peak is never reported below 0.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(0, int(torch.cuda.max_memory_allocated(device)) - int(start))
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_native_stderr():  # the profiler's native start/stop log lines
        prof.__enter__()
    try:
        result = fn()
    finally:
        with _quiet_native_stderr():
            prof.__exit__(None, None, None)
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += int(event.self_cpu_memory_usage)
        peak = max(peak, running)
    return result, peak


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null meanwhile (native libraries' log lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real stderr (embedded interpreters): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def profiling() -> bool:
    """Whether a ``torch.profiler`` session is running (a CPU :func:`peak_allocated` inside it
    would end the outer session, so callers skip their own measurement then)."""
    return bool(torch.autograd._profiler_enabled())


def tensor_bytes(obj: Any, *, _seen: set[int] | None = None, _depth: int = 0) -> int:
    """Bytes of the distinct tensor storages reachable from ``obj`` (attributes, containers).

    Storages shared by several tensors (views) are counted once. Follows ``__dict__``,
    ``__slots__``, lists, tuples, sets and dict values, up to a depth of 6.
    """
    seen = set() if _seen is None else _seen
    if isinstance(obj, Tensor):
        storage = obj.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            return 0
        seen.add(key)
        return int(storage.nbytes())
    if _depth > 6 or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.dtype,
                                      torch.device, type)):
        return 0
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    children: list[Any] = []
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        children = list(obj)
    else:
        children = list(getattr(obj, "__dict__", {}).values())
        for slot in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, slot):
                children.append(getattr(obj, slot))
    return sum(tensor_bytes(c, _seen=seen, _depth=_depth + 1) for c in children)
