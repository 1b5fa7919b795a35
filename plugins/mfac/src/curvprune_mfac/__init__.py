"""M-FAC for curvprune (Frantar, Kurtic & Alistarh, NeurIPS 2021).

* the ``mfac`` curvature estimator (:class:`MFACEstimator`, :class:`MFACConfig`): matrix-free
  inverse-Fisher-vector products with the static or the dynamic (sliding-window) algorithm;
* :class:`MFAC`, a ``torch.optim.Optimizer`` preconditioning with the dynamic algorithm;
* the algorithms themselves, on batched ``[b, m, W]`` tensors: :class:`StaticInverse` and
  :class:`SlidingWindow`.
"""

from __future__ import annotations

from curvprune_mfac.config import MFACConfig
from curvprune_mfac.dynamic import SlidingWindow
from curvprune_mfac.estimator import MFACEstimator
from curvprune_mfac.optimizer import MFAC
from curvprune_mfac.static import StaticInverse

__all__ = ["MFAC", "MFACConfig", "MFACEstimator", "SlidingWindow",
           "StaticInverse"]
