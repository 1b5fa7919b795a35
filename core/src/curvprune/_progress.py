"""Progress on long work: rich bars on a terminal, plain timestamped lines elsewhere.

On a terminal (standard error is a TTY) every task is a rich bar with its count, elapsed time
and an estimate of the time left. Off a terminal (``nohup``, CI logs, a pipe) the same tasks
print plain lines on standard error, ``2026-12-04 03:50:01 train dense 120/560 (21 %), 12 s,
~45 s left``: at most one every ``interval`` seconds while a task runs, and one when it
completes, so a log shows that the run is alive without flooding. ``enabled = False``
(``--quiet``, ``[run] progress = false``, ranks other than 0) prints nothing.

Callers never branch on the mode: :meth:`Progress.task` returns a callable that advances a task
by an amount, and :meth:`Progress.bar` does the same for a task that ends with its block.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Advance", "Progress"]

#: Advance a task by ``n`` units (default 1).
Advance = Callable[..., None]


class Progress:
    """``with Progress(enabled) as p: advance = p.task("train", total); advance()``.

    Args:
        enabled: show progress at all.
        interval: plain mode: the least time between two lines of one task (seconds).
        stream: where to write (default: standard error); bars only when it is a terminal.
    """

    def __init__(
        self, enabled: bool = True, *, interval: float = 10.0, stream: TextIO | None = None
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.interval = interval
        self.terminal = enabled and _isatty(self.stream)
        self._rich: Any = None

    def __enter__(self) -> Progress:
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def task(self, description: str, total: int | None) -> Advance:
        """Start a task of ``total`` units (None: unknown); the returned callable advances it."""
        if not self.enabled:
            return _nothing
        if self._rich is not None:
            task_id = self._rich.add_task(description, total=total)
            return lambda n=1: self._rich.advance(task_id, n)
        return _PlainTask(description, total, self.interval, self.stream).advance

    @contextmanager
    def bar(self, description: str, total: int | None) -> Iterator[Advance]:
        """A task that ends with the block (its bar is removed; plain mode: a closing line)."""
        if not self.enabled:
            yield _nothing
            return
        if self._rich is not None:
            task_id = self._rich.add_task(description, total=total)
            try:
                yield lambda n=1: self._rich.advance(task_id, n)
            finally:
                self._rich.remove_task(task_id)
            return
        plain = _PlainTask(description, total, self.interval, self.stream)
        try:
            yield plain.advance
        finally:
            plain.finish()

    @contextmanager
    def spinner(self, description: str) -> Iterator[None]:
        """Work of unknown length: a bar without a total."""
        with self.bar(description, None):
            yield


class _PlainTask:
    """One task in plain mode: timestamped lines, rate-limited."""

    def __init__(self, description: str, total: int | None, interval: float, stream: TextIO):
        self.description, self.total, self.interval, self.stream = (
            description, total, interval, stream)
        self.done = 0
        self.started = self.last = time.monotonic()
        self.finished = False

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        complete = self.total is not None and self.done >= self.total
        if complete or now - self.last >= self.interval:
            self.last = now
            self._line(self._status(now))
            self.finished = complete

    def finish(self) -> None:
        """Print the closing line of a task that ended early (or had no total)."""
        if not self.finished:
            self.finished = True
            ended = "done" if self.total is None else "stopped"
            self._line(self._status(time.monotonic(), eta=False) + f", {ended}")

    def _status(self, now: float, eta: bool = True) -> str:
        elapsed = now - self.started
        if self.total is None:
            return f"{self.done}, {elapsed:.0f} s"
        text = f"{self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f} %), " \
               f"{elapsed:.0f} s"
        if eta and 0 < self.done < self.total:
            text += f", ~{elapsed * (self.total - self.done) / self.done:.0f} s left"
        return text

    def _line(self, status: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {self.description} {status}", file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _nothing(n: int = 1) -> None:
    return None
