"""Registration hooks of the ``curvprune-mfac`` distribution (entry point ``mfac``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_mfac.config import MFACConfig
from curvprune_mfac.estimator import MFACEstimator


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``mfac`` estimator."""
    register("mfac", MFACEstimator, config=MFACConfig)
