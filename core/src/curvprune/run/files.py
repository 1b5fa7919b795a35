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
from curvprune.run.paths import new_folder, own_folder

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
def atomic_directory(final: Path, what: str = "run directory") -> Iterator[Path]:
    """Yield a hidden staging folder that becomes ``final`` only if the block succeeds.

    Raises:
        ConfigError: ``final`` exists (as anything, a symbolic link included) before the block
            starts or appears while it runs (another process took the name): nothing is
            replaced and the staging folder is removed.
    """
    final = new_folder(final, what)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        try:
            # rename(2) would replace an empty folder, or a link to one: claim the name first
            os.mkdir(final)
        except FileExistsError:
            raise ConfigError(
                f"{what} was created by another process while this one was writing; "
                f"this result was not kept @ {final}"
            ) from None
        try:
            os.replace(staging, final)
        except BaseException:
            os.rmdir(final)  # still the empty folder claimed above
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_result(run_dir: str | Path) -> dict[str, Any]:
    """The ``result.json`` of a run directory."""
    own_folder(run_dir, "the run directory", str(run_dir))
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
