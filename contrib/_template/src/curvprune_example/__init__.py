"""curvprune-example: an isotropic-Fisher curvature estimator (the plugin template)."""

from __future__ import annotations

from curvprune_example.estimator import IsotropicConfig, IsotropicEstimator

__all__ = ["IsotropicConfig", "IsotropicEstimator"]
