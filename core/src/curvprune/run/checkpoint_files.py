"""The checkpoint file format: plain tensors and values, saved atomically, read weights-only.

A checkpoint is one ``torch.save`` of a dict holding only tensors and plain values (``None``,
bool, int, float, str, lists, tuples, dicts), checked before writing (:func:`check_plain`), and
read with ``torch.load(path, weights_only=True)`` (:func:`read_weights_only`): a file carrying any
other object is refused, never unpickled. :mod:`curvprune.run.checkpoints` decides what goes in.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from curvprune.errors import CheckpointError
from curvprune.run.files import write_atomic

__all__ = ["FORMAT", "check_plain", "load_checkpoint_file", "read_weights_only", "save_checkpoint"]

FORMAT = "curvprune.checkpoint/1"
_REQUIRED = ("format", "phase", "config_sha256", "loop", "model", "optimizer", "session", "rng")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back.

    Raises:
        TypeError: naming the key path of the first offending value.
    """
    # exact types: a str or int subclass (torch.__version__ is one) is pickled as its class
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, Tensor):
        return
    if type(obj) in (list, tuple):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if type(obj) is dict:
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"key {key!r} of {where} is not a string or an integer")
            check_plain(value, f"{where}.{key}")
        return
    raise TypeError(f"{where} is a {type(obj).__name__}, not a tensor or a plain value")


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` through a temporary file and an atomic rename.

    The previous file at ``path`` stays whole until the new one is complete.

    Raises:
        TypeError: ``state`` holds something other than tensors and plain values.
    """
    state = dict(state)
    check_plain(state)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(Path(path), buffer.getvalue())


def read_weights_only(path: str | Path) -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or one carrying objects that
            weights-only loading refuses (they are never unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found @ {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [
            ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln
        ]
        what = lines[0] if lines else " ".join(str(exc).split())[:200]
        raise CheckpointError(
            f"checkpoint holds objects that weights-only loading refuses ({what}); it was not "
            f"loaded @ {path}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointError(f"checkpoint is truncated or corrupt ({reason}) @ {path}") from None


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read and check a run checkpoint written by :class:`RunCheckpoints`.

    Raises:
        CheckpointError: unreadable, unsafe, of another format, or missing keys.
    """
    state = read_weights_only(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"not a curvprune run checkpoint (format {got!r}, want {FORMAT!r}) @ {path}"
        )
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(map(repr, missing))} @ {path}")
    return state
