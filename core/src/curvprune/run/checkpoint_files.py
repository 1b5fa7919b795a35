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
from torch import Tensor, nn

from curvprune.errors import CheckpointError, ConfigError
from curvprune.run.files import write_atomic

__all__ = [
    "FORMAT",
    "check_plain",
    "check_state_fits",
    "load_checkpoint_file",
    "read_safetensors",
    "read_weights_only",
    "safetensors_state",
    "save_checkpoint",
]

FORMAT = "curvprune.checkpoint/1"
_REQUIRED = ("format", "phase", "config_sha256", "loop", "model", "optimizer", "session", "rng")
#: a one-shot prune checkpointed between stages has no optimizer or session, but its progress
_REQUIRED_PRUNE = ("format", "phase", "config_sha256", "loop", "model", "rng", "extra")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def safetensors_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` as safetensors saves it: detached, on the CPU, contiguous, and every key kept.

    safetensors refuses tensors that share memory; a tied weight (GPT-2's ``lm_head`` and
    ``wte``) is two keys of one tensor, so the second is stored as a copy. Loading the state
    into the model with ``load_state_dict`` writes both keys into the one tied parameter.
    """
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        tensor = value.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()
        storages.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


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


def read_weights_only(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors.

    Whatever the weights-only unpickler raises (a text file gives a ``KeyError``, a truncated one
    an ``EOFError`` or a ``RuntimeError``, a pickle carrying code an ``UnpicklingError``) becomes a
    :class:`CheckpointError` naming the file; no object outside tensors and plain values is ever
    constructed.

    Raises:
        CheckpointError: missing, truncated, corrupt or unsafe file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found @ {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [
            ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unsupported" in ln
        ]
        why = _short(lines[0] if lines else exc)
        raise CheckpointError(
            f"{what} holds objects that weights-only loading refuses ({why}); it was not loaded "
            f"@ {path}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the reader is a bad file
        raise CheckpointError(f"{what} is truncated or corrupt ({_short(exc)}) @ {path}") from exc


def read_safetensors(path: str | Path, what: str = "tensor file") -> dict[str, Tensor]:
    """The tensors of a safetensors file, with one-line errors.

    Raises:
        CheckpointError: missing, truncated or corrupt file (whatever safetensors raises).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found @ {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure of the reader is a bad file
        raise CheckpointError(f"{what} is truncated or corrupt ({_short(exc)}) @ {path}") from exc


def _short(exc: object, limit: int = 80) -> str:
    """A reader's error on one line, cut to ``limit`` characters (the whole one is in --debug)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, BaseException) and type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
    required = _REQUIRED_PRUNE if state.get("phase") == "prune" else _REQUIRED
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint lacks {', '.join(map(repr, missing))} @ {path}")
    return state


def check_state_fits(model: nn.Module, state: Mapping[str, Tensor], where: str | Path) -> None:
    """Refuse, before touching ``model``, a state dict with other keys or shapes.

    The message names at most three keys and stays on one short line, however large the model.

    Raises:
        ConfigError: missing or unexpected keys, or a shape that differs.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        keys = missing or extra
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        what = f"{'missing' if missing else 'unexpected'} {', '.join(keys[:3])}{more}"
        raise ConfigError(f"the saved weights do not fit {type(model).__name__} ({what}) @ {where}")
    for key, value in own.items():
        if tuple(value.shape) != tuple(state[key].shape):
            raise ConfigError(
                f"the saved weights do not fit {type(model).__name__} ({key}: saved "
                f"{list(state[key].shape)}, model {list(value.shape)}) @ {where}"
            )

