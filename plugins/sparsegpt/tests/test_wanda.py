"""WANDA and the magnitude baseline: scores, comparison groups, exact counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune_sparsegpt import LayerHessian, magnitude, prune_count, wanda, wanda_scores

try:  # the repo's --import-mode=importlib (root addopts)
    from .conftest import F64, correlated_inputs
except ImportError:  # the default prepend mode puts tests/ on sys.path
    from conftest import F64, correlated_inputs


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.integers(1, 24), st.sampled_from([0.0, 0.3, 0.5, 0.77, 1.0]),
       st.integers(0, 2**16))
def test_wanda_per_row_from_hessian_statistics(rows, d, sparsity, seed):
    x = correlated_inputs(d, 40, seed=seed)
    w = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    acc = LayerHessian(d, dtype=F64)
    for part in torch.split(x, 13):
        acc.add_batch(part)
    norms = x.norm(dim=0)  # ‖X_j‖₂ over all 40 calibration vectors
    torch.testing.assert_close(acc.column_norms(), norms, rtol=1e-12, atol=0)
    scores = w.abs() * norms
    torch.testing.assert_close(wanda_scores(w, acc), scores, rtol=1e-12, atol=0)
    res = wanda(w, acc, sparsity=sparsity)
    k = prune_count(d, sparsity)
    assert ((~res.mask).sum(1) == k).all()
    assert (res.weight[~res.mask] == 0).all() and torch.equal(res.weight[res.mask], w[res.mask])
    if 0 < k < d:  # every pruned score ≤ every kept score of the same row
        worst_pruned = torch.where(res.mask, -torch.inf, scores).amax(1)
        best_kept = torch.where(res.mask, scores, torch.inf).amin(1)
        assert (worst_pruned <= best_kept).all()
    assert res.loss is None


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.sampled_from([(2, 4), (4, 8), (1, 2)]), st.integers(1, 4),
       st.integers(0, 2**16))
def test_nm_groups(rows, nm, groups, seed):
    n, m = nm
    d = m * groups
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, d, generator=g, dtype=F64)
    norms = torch.rand(d, generator=g, dtype=F64) + 0.1
    for res, scores in ((wanda(w, norms, prune_n=n, prune_m=m), w.abs() * norms),
                        (magnitude(w, prune_n=n, prune_m=m), w.abs())):
        pruned = (~res.mask).reshape(rows, groups, m)
        assert (pruned.sum(2) == n).all()
        s = scores.reshape(rows, groups, m)
        assert (torch.where(pruned, s, -torch.inf).amax(2)
                <= torch.where(pruned, torch.inf, s).amin(2)).all()


def test_magnitude_layer_scope_and_checks():
    w = torch.arange(1.0, 13.0).reshape(3, 4)
    res = magnitude(w, sparsity=0.5)
    assert torch.equal(res.mask, w > 6)
    with pytest.raises(ValueError, match="column norms"):
        wanda(w, torch.ones(3), sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity or prune_n"):
        wanda(w, torch.ones(4))
