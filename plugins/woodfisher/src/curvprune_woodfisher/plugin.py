"""Registration hooks of the ``curvprune-woodfisher`` distribution (entry point ``woodfisher``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_woodfisher.config import WoodFisherConfig, WoodTaylorConfig
from curvprune_woodfisher.estimator import WoodFisherEstimator
from curvprune_woodfisher.woodtaylor import WoodTaylorScorer


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``woodfisher`` estimator."""
    register("woodfisher", WoodFisherEstimator, config=WoodFisherConfig)


@hookimpl
def curvprune_register_saliency_scorers(register: Register) -> None:
    """Register the ``woodtaylor`` scorer."""
    register("woodtaylor", WoodTaylorScorer, config=WoodTaylorConfig)
