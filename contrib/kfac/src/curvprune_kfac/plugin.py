"""Registration hooks of the ``curvprune-kfac`` distribution (entry point ``kfac``)."""

from __future__ import annotations
