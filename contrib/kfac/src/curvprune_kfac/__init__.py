"""curvprune-kfac: K-FAC (Martens & Grosse, 2015) through curvlinops, the WoodFisher baseline."""

from __future__ import annotations

from curvprune_kfac.config import KFACConfig
from curvprune_kfac.estimator import KFACEstimator
from curvprune_kfac.kronecker import KroneckerInverse

__all__ = ["KFACConfig", "KFACEstimator", "KroneckerInverse"]
