"""Registration hooks: the entry point's target. Keep this module to @hookimpl functions only."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_example.estimator import IsotropicConfig, IsotropicEstimator


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``isotropic`` estimator."""
    register("isotropic", IsotropicEstimator, config=IsotropicConfig)
