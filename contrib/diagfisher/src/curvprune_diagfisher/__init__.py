"""curvprune-diagfisher: the diagonal empirical Fisher, the Optimal Brain Damage baseline."""

from __future__ import annotations

from curvprune_diagfisher.estimator import DiagFisherConfig, DiagFisherEstimator

__all__ = ["DiagFisherConfig", "DiagFisherEstimator"]
