"""Measured inference latency of a dense and a physically smaller model (the speed-up removal buys).

FLOP counts say what removal could save; this measures what it does save on the machine at hand.
For each batch size (1 and 32 by default) both models run the same input in eval mode under
``torch.inference_mode``, with the run's thread count. Rounds alternate between the two models
(dense, pruned, dense, ...) so that a change of machine load hits both alike; each round is one
warm-up forward and then timed forwards until ``min_repeats`` and ``min_seconds`` are both
reached (at most ``max_repeats``). The figure is the median of every timed forward of a model.
CUDA forwards are synchronized before the clock is read.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["latency_record", "time_forward"]


def _batch(example: Tensor, size: int) -> Tensor:
    """``example``'s first sample repeated ``size`` times (a contiguous batch)."""
    one = example[:1]
    return one.expand(size, *one.shape[1:]).contiguous()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    model: nn.Module, x: Tensor, *, min_repeats: int = 5, min_seconds: float = 0.2,
    max_repeats: int = 50,
) -> list[float]:
    """Seconds of each timed forward of ``model`` on ``x`` (after one untimed warm-up)."""
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            model(x)
            _sync(x.device)
            spent = 0.0
            while len(times) < max_repeats and (len(times) < min_repeats or spent < min_seconds):
                tick = time.perf_counter()
                model(x)
                _sync(x.device)
                times.append(time.perf_counter() - tick)
                spent += times[-1]
    finally:
        model.train(was_training)
    return times


def latency_record(
    dense: nn.Module, pruned: nn.Module, example: Tensor, *, batch_sizes: tuple[int, ...] = (1, 32),
    rounds: int = 3, **timing: Any,
) -> dict[str, Any]:
    """Median forward latency of ``dense`` and ``pruned`` per batch size, and the speed-up.

    Returns the ``latency`` entry of a run's ``result.json``: the device, the thread count and,
    per batch size, ``dense_ms``, ``pruned_ms`` and ``speedup`` (dense / pruned).
    """
    out: dict[str, Any] = {
        "device": str(example.device), "threads": torch.get_num_threads(), "rounds": rounds,
        "batch_sizes": {},
    }
    for size in batch_sizes:
        x = _batch(example, size)
        samples: dict[str, list[float]] = {"dense": [], "pruned": []}
        for _ in range(rounds):
            samples["dense"] += time_forward(dense, x, **timing)
            samples["pruned"] += time_forward(pruned, x, **timing)
        dense_s, pruned_s = (statistics.median(samples[k]) for k in ("dense", "pruned"))
        out["batch_sizes"][str(size)] = {
            "dense_ms": dense_s * 1e3, "pruned_ms": pruned_s * 1e3,
            "speedup": dense_s / pruned_s if pruned_s > 0 else None,
        }
    return out
