"""Registration hooks of the ``curvprune-sosp`` distribution (entry point ``sosp``)."""

from __future__ import annotations
