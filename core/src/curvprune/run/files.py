"""The files of a run: atomic writes, atomic run directories, and reading ``result.json``.

Every file curvprune writes goes through a temporary name and an atomic rename, and a run
directory appears only once everything in it is written, so an interrupted run never leaves a
half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curvprune.errors import ConfigError

__all__ = ["SCHEMA", "atomic_directory", "read_result", "write_atomic"]

#: Schema tag of ``result.json`` (documented in docs/results.md).
SCHEMA = "curvprune.result/1"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden staging folder that becomes ``final`` only if the block succeeds."""
    final = Path(final)
    if final.exists():
        raise ConfigError(f"run directory already exists @ {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """The ``result.json`` of a run directory."""
    path = Path(run_dir) / "result.json"
    if not path.is_file():
        raise ConfigError(f"not a run directory (no result.json) @ {run_dir}")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"result.json is corrupt ({exc}) @ {path}") from None
    if record.get("schema") != SCHEMA:
        raise ConfigError(f"unknown result schema {record.get('schema')!r} @ {path}")
    return record
