"""Registration hooks of the ``curvprune-diagfisher`` distribution (entry point ``diagfisher``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_diagfisher.estimator import DiagFisherConfig, DiagFisherEstimator


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``diagfisher`` estimator."""
    register("diagfisher", DiagFisherEstimator, config=DiagFisherConfig)
