"""Progress bars on long work: rich on a terminal, nothing otherwise (or with ``--quiet``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A thin wrapper: ``with Progress(enabled) as p: advance = p.task("train", total)``.

    Bars draw on standard error and only when it is a terminal, so logs and pipes stay clean.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._rich: Any = None

    def __enter__(self) -> Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def task(self, description: str, total: int) -> Callable[[], None]:
        """Start a bar; the returned callable advances it by one."""
        if self._rich is None:
            return _nothing
        task_id = self._rich.add_task(description, total=total)
        return lambda: self._rich.advance(task_id)

    @contextmanager
    def spinner(self, description: str) -> Iterator[None]:
        """A bar without a total for work of unknown length."""
        if self._rich is None:
            yield
            return
        task_id = self._rich.add_task(description, total=None)
        try:
            yield
        finally:
            self._rich.remove_task(task_id)


def _nothing() -> None:
    return None
