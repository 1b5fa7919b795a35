"""``<out>/<name>.partial/``: the folder of a run in progress, its lock, config and checkpoint.

:class:`PartialRun` creates (or reopens, to resume) the folder, takes an advisory lock so two
processes never continue the same run, and knows where the config and the latest checkpoint
live. What a checkpoint holds is :mod:`curvprune.run.checkpoints`' business.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from curvprune._log import get_logger
from curvprune.errors import CheckpointError, ConfigError
from curvprune.run.files import write_atomic

__all__ = ["CHECKPOINT", "PARTIAL_SUFFIX", "PartialRun", "sha256_of", "unique_name"]

CHECKPOINT = "checkpoint.pt"
PARTIAL_SUFFIX = ".partial"

log = get_logger(__name__)


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()




# --------------------------------------------------------------------------------------------
# The partial run directory
# --------------------------------------------------------------------------------------------
class PartialRun:
    """``<out>/<name>.partial/``: the config and latest checkpoint of a run in progress.

    Create one with :meth:`create` (a new run) or :meth:`open` (to resume); both take the lock.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name[: -len(PARTIAL_SUFFIX)]
        self.out = path.parent
        self._lock: Any = None

    @property
    def config_path(self) -> Path:
        """The resolved config of the run."""
        return self.path / "config.toml"

    @property
    def checkpoint_path(self) -> Path:
        """The latest checkpoint (may not exist yet)."""
        return self.path / CHECKPOINT

    @property
    def final(self) -> Path:
        """The run directory the run writes when it completes."""
        return self.out / self.name

    @classmethod
    def create(cls, out: Path, name: str, config_text: str) -> PartialRun:
        """Make ``<out>/<name>.partial`` with ``config.toml``.

        Raises:
            ConfigError: the folder exists already.
        """
        path = Path(out) / f"{name}{PARTIAL_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir()
        except FileExistsError:
            raise ConfigError(
                f"an interrupted run of that name exists; resume it @ {path}"
            ) from None
        partial = cls(path)
        try:
            partial.acquire()
            write_atomic(partial.config_path, config_text)
        except BaseException:
            partial.release()
            shutil.rmtree(path, ignore_errors=True)
            raise
        return partial

    @classmethod
    def open(cls, path: str | Path, *, lock: bool = True) -> PartialRun:
        """The interrupted run at ``path``: ``<name>.partial`` (or ``<name>``, if only that exists).

        Args:
            path: the partial folder, or the run directory it will become.
            lock: take the lock now (else call :meth:`acquire` later).

        Raises:
            CheckpointError: not an interrupted run, a completed run, or one that is running.
        """
        path = Path(path)
        if (path / "result.json").is_file():
            raise CheckpointError(
                f"this run is complete (it has a result.json); there is nothing to resume @ {path}"
            )
        if not path.name.endswith(PARTIAL_SUFFIX):
            sibling = path.with_name(path.name + PARTIAL_SUFFIX)
            if not sibling.is_dir():
                raise CheckpointError(
                    f"no interrupted run here (expected a '<name>{PARTIAL_SUFFIX}' folder) @ {path}"
                )
            path = sibling
        if not path.is_dir():
            raise CheckpointError(f"no interrupted run here (no such folder) @ {path}")
        if path.is_symlink():
            raise CheckpointError(
                f"the interrupted run's folder is a symbolic link; resume the real folder @ {path}"
            )
        partial = cls(path)
        if not partial.config_path.is_file():
            raise CheckpointError(f"not a partial run directory (no config.toml) @ {path}")
        if (partial.final / "result.json").is_file():
            raise CheckpointError(
                f"this run completed already (its run directory {partial.final} exists); delete "
                f"the partial folder @ {path}"
            )
        if lock:
            partial.acquire()
        return partial

    def acquire(self) -> None:
        """Take the advisory lock (released by :meth:`release`, or when the process dies).

        Raises:
            CheckpointError: another process holds it.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        handle = open(self.path / ".lock", "a+")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise CheckpointError(f"another process is running this run @ {self.path}") from None
        self._lock = handle

    def release(self) -> None:
        """Release the lock (the folder stays)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        """Delete the folder (the run completed, or failed with nothing to resume)."""
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)


def unique_name(out: Path, name: str) -> str:
    """``name``, or ``name-2``, ``name-3``, ... so neither the run nor its partial folder exists."""
    candidate, n = name, 2
    while os.path.lexists(out / candidate) or os.path.lexists(out / f"{candidate}{PARTIAL_SUFFIX}"):
        candidate = f"{name}-{n}"
        n += 1
    return candidate
