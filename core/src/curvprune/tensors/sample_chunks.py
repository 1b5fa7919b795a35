"""Regrouping a stream of ``(inputs, targets)`` batches into chunks of a fixed number of samples
(the per-sample-gradient chunks of :class:`curvprune.GradientSource`)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

from curvprune.errors import ConfigError, SampleReuseWarning

__all__ = ["sample_chunks", "split_batch"]


def sample_chunks(
    batches: Iterable[Any], total: int, per_chunk: int, took: Callable[[int], None]
) -> Iterator[tuple[Tensor, Tensor]]:
    """Regroup ``batches`` into chunks of ``per_chunk`` samples, ``total`` samples in all.

    Re-iterates ``batches`` from the start when it runs out (with a
    :class:`~curvprune.errors.SampleReuseWarning`), or raises if it cannot; ``took(n)`` is
    called with the number of samples of each chunk once it has been consumed.
    """
    used = 0
    pending_x: list[Tensor] = []
    pending_y: list[Tensor] = []
    have = 0
    remaining = total
    restartable = not isinstance(batches, Iterator)
    passes = 0
    while remaining > 0:
        seen_in_pass = 0
        for batch in batches:
            x, y = split_batch(batch)
            seen_in_pass += x.shape[0]
            pending_x.append(x)
            pending_y.append(y)
            have += x.shape[0]
            while have >= min(per_chunk, remaining) and remaining > 0:
                take = min(per_chunk, remaining)
                xs, ys = torch.cat(pending_x), torch.cat(pending_y)
                yield xs[:take], ys[:take]
                took(take)
                used += take
                pending_x, pending_y = [xs[take:]], [ys[take:]]
                have -= take
                remaining -= take
            if remaining <= 0:
                return
        passes += 1
        if seen_in_pass == 0:
            raise ConfigError("the data holds no sample to compute gradients on @ data")
        if not restartable:
            raise ConfigError(
                f"the data ran out after {used + have} samples; gradients need "
                f"{total} (num_grads × fisher_mini_batch): pass a re-iterable DataLoader "
                "or lower num_grads"
            )
        if passes == 1:
            warnings.warn(
                f"the data holds {seen_in_pass} samples but the gradients need {total} "
                f"(num_grads × fisher_mini_batch): samples are reused "
                f"{-(-total // seen_in_pass)} times over; lower num_grads or add data",
                SampleReuseWarning,
                stacklevel=2,
            )


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, targets)`` of a batch, or a one-line error naming what it is."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError(
        f"each batch must be an (inputs, targets) pair, got {type(batch).__name__} @ data"
    )
