"""Who this process is under torch.distributed: joining, leaving and the rank's identity.

Split from :mod:`curvprune.tensors.distributed` (which re-exports every name here, the public
``curvprune.distributed``) so that the collectives stay one module of one purpose.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch

from curvprune.errors import ConfigError

__all__ = ["barrier", "init_from_env", "is_distributed", "local", "rank", "rank_tag",
           "shutdown", "world_size"]

#: Whether this module initialized the process group (and so may destroy it).
_OWNED_GROUP = False
#: Nesting depth of :func:`local` blocks.
_LOCAL_DEPTH = 0


# --------------------------------------------------------------------------------------------
# Who am I
# --------------------------------------------------------------------------------------------
def is_distributed() -> bool:
    """Whether :mod:`torch.distributed` is available and a process group is initialized
    (and this process is not inside :func:`local`)."""
    return (
        _LOCAL_DEPTH == 0
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    )


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the block, curvprune treats this process as alone (rank 0 of 1) even though a
    process group exists: no sharding, no collectives. For work one rank does by itself, such
    as a single-process reference run or an evaluation on rank 0 only."""
    global _LOCAL_DEPTH
    _LOCAL_DEPTH += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH -= 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return torch.distributed.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return torch.distributed.get_world_size() if is_distributed() else 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r} @ environment") from None


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group ``torchrun`` describes, if any; return the device to run on.

    With ``WORLD_SIZE > 1`` in the environment and no process group yet, initialize one from the
    ``env://`` variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``): NCCL for a
    CUDA ``device`` (which becomes ``cuda:LOCAL_RANK``), gloo otherwise. Without ``WORLD_SIZE``
    (or with 1) nothing happens. An already initialized group is used as it is.

    Args:
        device: the device the config asks for (``resolve_device`` output).

    Returns:
        The device for this rank.

    Raises:
        ConfigError: malformed variables, or ``LOCAL_RANK`` beyond the visible CUDA devices.
    """
    size = _env_int("WORLD_SIZE", 1)
    if device.type == "cuda" and (size > 1 or is_distributed()):
        local_rank = _env_int("LOCAL_RANK", 0)
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible; start at most that many processes per node @ environment"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if size <= 1 or is_distributed():
        return device
    if not torch.distributed.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch has no torch.distributed @ environment")
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if name not in os.environ:
            raise ConfigError(
                f"WORLD_SIZE={size} but {name} is not set; launch with torchrun @ environment"
            )
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend)
    global _OWNED_GROUP
    _OWNED_GROUP = True
    return device


def shutdown(*, synchronize: bool = False) -> None:
    """Destroy the process group if :func:`init_from_env` created it (a user's group stays).

    Args:
        synchronize: wait for every rank first (after a success, when every rank gets here):
            a rank that tears gloo down while another still talks to it can abort the other
            ("terminate called without an active exception"). Never after a failure, where a
            rank may be gone and the barrier would only wait for the timeout.
    """
    global _OWNED_GROUP
    if _OWNED_GROUP and is_distributed():
        if synchronize:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        gc.collect()  # gloo's work objects go now, not during interpreter finalization
    _OWNED_GROUP = False


def rank_tag() -> str:
    """``" [rank r/W]"`` when distributed, else ``""`` (for messages printed by every rank)."""
    return f" [rank {rank()}/{world_size()}]" if is_distributed() else ""


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        torch.distributed.barrier()
