"""Registration hooks of the ``curvprune-greg`` distribution (entry point ``greg``)."""

from __future__ import annotations
