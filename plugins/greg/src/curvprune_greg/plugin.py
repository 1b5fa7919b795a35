"""Registration hooks of the ``curvprune-greg`` distribution (entry point ``greg``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_greg.config import GRegConfig
from curvprune_greg.schedule import GRegSchedule


@hookimpl
def curvprune_register_schedulers(register: Register) -> None:
    """Register the ``greg`` schedule."""
    register("greg", GRegSchedule, config=GRegConfig)
