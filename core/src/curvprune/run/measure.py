"""What a run measures about itself: peak memory, versions, and the warnings it raised."""

from __future__ import annotations

import contextlib
import platform
import resource
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from curvprune.errors import CurvpruneWarning
from curvprune.plugin.manager import PluginHost

__all__ = ["collect_warnings", "peak_memory", "reset_peak_rss", "versions"]


def versions(host: PluginHost) -> dict[str, str]:
    """Python, torch and every plugin distribution's version, for result.json."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for info in host.plugin_infos():
        if info.distribution and info.version:
            out[info.distribution] = info.version
    return out


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device, rss_reset: bool = False) -> tuple[int, str]:
    """Peak bytes of this run and how they were measured.

    On CPU the RSS high-water mark (VmHWM) is reset when the run starts where Linux allows it,
    so runs in one process (``compare``) each report their own peak; elsewhere the process's
    lifetime peak (``ru_maxrss``) is all there is.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    if rss_reset:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024, "peak RSS of the process during the run"
        except OSError:
            pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "peak RSS of the process"


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Keep the run's :class:`CurvpruneWarning` messages for its report; they still print."""
    original = warnings.showwarning
    collected: list[str] = []

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if issubclass(category, CurvpruneWarning) and str(message) not in collected:
            collected.append(str(message))
        original(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield collected
    finally:
        warnings.showwarning = original
