"""Registration hooks of the ``curvprune-sparsegpt`` distribution (entry point ``sparsegpt``)."""

from __future__ import annotations

from curvprune import Register, hookimpl
from curvprune_sparsegpt.estimator import SparseGPTConfig, SparseGPTEstimator
from curvprune_sparsegpt.scorer import WandaConfig, WandaScorer


@hookimpl
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register the ``sparsegpt`` estimator (layer-wise Hessians; OBS through ``obs``)."""
    register("sparsegpt", SparseGPTEstimator, config=SparseGPTConfig)


@hookimpl
def curvprune_register_saliency_scorers(register: Register) -> None:
    """Register the ``wanda`` scorer."""
    register("wanda", WandaScorer, config=WandaConfig)
