"""What every benchmark script prints about the machine, and its one timing rule."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch


def cpu_count() -> int:
    """Cores this process may run on (its affinity set where the OS tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or what the platform module knows)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> str:
    """``<CPU model>, <n> cores, torch threads <t>`` (printed after ``machine: ``)."""
    return f"{cpu_model()}, {cpu_count()} cores, torch threads {torch.get_num_threads()}"


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
