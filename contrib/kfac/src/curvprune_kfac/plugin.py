"""Registration hooks of the ``curvprune-kfac`` distribution (entry point ``kfac``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_kfac.config import KFACConfig
from curvprune_kfac.estimator import KFACEstimator


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``kfac`` estimator."""
    register("kfac", KFACEstimator, config=KFACConfig)
