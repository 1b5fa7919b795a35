"""WoodFisher for curvprune (Singh & Alistarh, NeurIPS 2020).

* estimator ``woodfisher``: explicit block inverses of F = λI + (1/m)·Σ ggᵀ, by the paper's
  rank-1 Woodbury recursion or by batched Gram + Cholesky (:class:`WoodFisherEstimator`);
* scorer ``woodtaylor``: OBS with the first-order term kept (:class:`WoodTaylorScorer`).

Pair the estimator with the core's ``obs`` scorer for WoodFisher pruning as in the paper.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from curvprune_woodfisher.config import WoodFisherConfig, WoodTaylorConfig
from curvprune_woodfisher.estimator import WoodFisherEstimator
from curvprune_woodfisher.woodtaylor import WoodTaylorScorer

try:
    __version__ = version("curvprune-woodfisher")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "WoodFisherConfig",
    "WoodFisherEstimator",
    "WoodTaylorConfig",
    "WoodTaylorScorer",
    "__version__",
]
