"""Run a function in several gloo processes from a test: :func:`run_distributed`.

Plugin authors check that their estimator or scorer gives one process's answer under
torch.distributed with::

    from curvprune.testing.distributed import run_distributed

    def _worker(rank, world_size, config):          # module level: it is pickled by reference
        ...                                          # the process group is initialized here
        return {"mask": result.masks.flat}           # tensors and plain values

    def test_two_processes_agree():
        results = run_distributed(_worker, ({"name": "mine"},), world_size=2)
        assert torch.equal(results[0]["mask"], results[1]["mask"])

Each process is started with the ``spawn`` method, joins a gloo group on 127.0.0.1 at a free
port, runs with one torch thread (timings and round-off then match a one-thread reference), and
hands its return value back through a file read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

__all__ = ["free_port", "run_distributed"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(
    index: int,
    fn: Callable[..., Any],
    args: Sequence[Any],
    world_size: int,
    port: int,
    folder: str,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(index),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=index, world_size=world_size)
    try:
        result = fn(index, world_size, *args)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
        gc.collect()  # free gloo's work objects while the interpreter is whole
    torch.save(result, Path(folder) / f"rank{index}.pt")
    # Leave without interpreter finalization: gloo threads that still hold a tensor can abort
    # the process there (SIGABRT, "terminate called without an active exception") once the
    # result is safely on disk, which made two-process tests flaky on a loaded machine.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any],
    args: Sequence[Any] = (),
    *,
    world_size: int = 2,
    timeout: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; return each result.

    Args:
        fn: a module-level function (pickled by reference); the process group is initialized
            when it runs. Its return value must be loadable with ``weights_only=True``
            (tensors, numbers, strings, lists, dicts).
        args: extra arguments (picklable).
        world_size: number of processes.
        timeout: seconds before the processes are killed and ``TimeoutError`` is raised.

    Raises:
        torch.multiprocessing.ProcessRaisedException: a worker raised (with its traceback).
        TimeoutError: the workers did not finish in time (a collective mismatch hangs).
    """
    with tempfile.TemporaryDirectory(prefix="curvprune-dist-") as folder:
        context = mp.start_processes(
            _entry, args=(fn, tuple(args), world_size, free_port(), folder),
            nprocs=world_size, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} processes did not finish in {timeout:.0f} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [
            torch.load(Path(folder) / f"rank{r}.pt", weights_only=True) for r in range(world_size)
        ]
