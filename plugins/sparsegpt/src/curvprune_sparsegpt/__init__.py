"""Layer-wise OBS for curvprune: SparseGPT, OBC-exact and WANDA (the numerical core).

* :class:`LayerHessian`: ``H = (2/n)·Σ xxᵀ`` over a layer's calibration inputs (Linear, Conv2d
  via unfold, transformers-style Conv1D), and :func:`inverse_factor`: damping and the upper
  Cholesky factor of H̃⁻¹;
* :func:`sparsegpt`: the SparseGPT column sweep (Frantar & Alistarh, ICML 2023), unstructured,
  N:M or with a given mask;
* :func:`obc`: OBC-exact greedy OBS per row (Frantar & Alistarh, NeurIPS 2022), the ground truth
  for small layers;
* :func:`wanda` (Sun et al., ICLR 2024) and :func:`magnitude`, no-update baselines;
* :func:`layer_error`: ``tr(ΔW·H·ΔWᵀ)`` to compare them.

Pure torch. In the pipeline (registered by :mod:`curvprune_sparsegpt.plugin`): the
``sparsegpt`` estimator (:mod:`curvprune_sparsegpt.estimator`; SparseGPT or OBC through the
``obs`` scorer) and the ``wanda`` scorer (:mod:`curvprune_sparsegpt.scorer`).
"""

from __future__ import annotations

from curvprune_sparsegpt.hessian import (
    DampingWarning,
    HessianError,
    InverseFactor,
    LayerHessian,
    inverse_factor,
    layer_inputs,
    set_weight_matrix,
    weight_matrix,
)
from curvprune_sparsegpt.masks import PruneResult, layer_error, prune_count, score_mask
from curvprune_sparsegpt.obc import obc
from curvprune_sparsegpt.sweep import sparsegpt
from curvprune_sparsegpt.wanda import magnitude, wanda, wanda_scores

__all__ = [
    "DampingWarning",
    "HessianError",
    "InverseFactor",
    "LayerHessian",
    "PruneResult",
    "inverse_factor",
    "layer_error",
    "layer_inputs",
    "magnitude",
    "obc",
    "prune_count",
    "score_mask",
    "set_weight_matrix",
    "sparsegpt",
    "wanda",
    "wanda_scores",
    "weight_matrix",
]
