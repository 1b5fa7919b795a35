"""Where a run reads and writes: names and folders are checked before anything is written.

* A **run name** (``--name``, ``[run] name``, ``execute_run(name=...)``) is one folder name inside
  the output folder (:func:`curvprune.config.run_name_problem`): ``../x``, ``/abs``, ``a/b`` and
  control characters are refused, so a run never writes outside ``--out``. ``--out`` itself may be
  anywhere.
* A folder curvprune **creates** (a run directory, an export folder, a partial run folder) must
  not exist yet, not even as a dangling symbolic link: a link would redirect the write.
* A run directory curvprune **writes into** (re-rendered by ``report``, exported, resumed with
  ``--resume``) must not be a symbolic link: only folders curvprune made are written into.
* The output and cache folders (``--out``, ``[run] out``) are the user's choice, anywhere, a
  symbolic link to a folder included; they must be folders if they exist.
* A file curvprune **reads** (``[model] checkpoint``, masks, weights) must be an existing regular
  file; how its contents are checked is up to the reader (weights-only ``torch.load``,
  safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path

from curvprune.config import run_name_problem, shown
from curvprune.errors import ConfigError

__all__ = ["check_run_name", "existing_file", "new_folder", "own_folder", "user_folder"]


def check_run_name(name: str, where: str = "--name") -> str:
    """``name`` if it can name a run directory.

    Raises:
        ConfigError: naming the problem (a separator, ``..``, a control character, ...).
    """
    problem = run_name_problem(name)
    if problem:
        raise ConfigError(
            f"run name {shown(name)} {problem}; it must be a single folder name @ {where}"
        )
    return name


def own_folder(path: str | Path, what: str, where: str) -> Path:
    """``path`` as a folder curvprune may write into (it may not exist yet).

    Raises:
        ConfigError: ``path`` is a symbolic link, or exists and is not a folder.
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        raise ConfigError(f"{what} is a symbolic link; give the real folder @ {where}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} is not a folder @ {where}")
    return path


def user_folder(path: str | Path, what: str, where: str) -> Path:
    """``path`` as a folder the user chose to hold run directories (it may not exist yet).

    Raises:
        ConfigError: it exists and is not a folder (nor a symbolic link to one).
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what} is not a folder: {path} @ {where}")
    if path.is_symlink() and not path.exists():
        raise ConfigError(f"{what} is a dangling symbolic link: {path} @ {where}")
    return path


def new_folder(path: str | Path, what: str, where: str | None = None) -> Path:
    """``path`` as a folder curvprune is about to create.

    Raises:
        ConfigError: something (a folder, a file, a symbolic link) is there already.
    """
    path = Path(path).expanduser()
    if os.path.lexists(path):
        kind = " as a symbolic link" if path.is_symlink() else ""
        raise ConfigError(
            f"{what} exists already{kind}; choose another or delete it @ {where or path}"
        )
    user_folder(path.parent, f"the folder of the {what}", where or str(path.parent))
    return path


def existing_file(path: str | Path, what: str, where: str) -> Path:
    """``path`` as a file curvprune is about to read.

    Raises:
        ConfigError: it does not exist or is not a regular file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what} not found: {path} @ {where}")
    if not path.is_file():
        raise ConfigError(f"{what} is not a regular file: {path} @ {where}")
    return path
