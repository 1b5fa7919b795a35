"""OBC-exact against the dense greedy OBS reference (full sub-Hessian inverse every step)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune_sparsegpt import obc, prune_count

try:  # the repo's --import-mode=importlib (root addopts)
    from .conftest import F64, correlated_inputs, damped, dense_greedy_obs, dense_hessian, quad
except ImportError:  # the default prepend mode puts tests/ on sys.path
    from conftest import F64, correlated_inputs, damped, dense_greedy_obs, dense_hessian, quad

ATOL = 1e-10  # float64, κ(H̃) ≲ 1e4: see conftest


def problem(rows: int, d: int, seed: int, mix: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    x = correlated_inputs(d, 3 * d, c=0.7, mix=mix, seed=seed)
    w = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    return w, dense_hessian(x)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 14), st.sampled_from([0.25, 0.5, 0.7, 1.0]),
       st.integers(0, 2**16), st.integers(1, 3))
def test_row_scope_equals_dense_greedy(rows, d, sparsity, seed, chunk):
    w, h = problem(rows, d, seed)
    res = obc(w, h, sparsity=sparsity, row_chunk=chunk)
    hd = damped(h)
    k = prune_count(d, sparsity)
    for r in range(rows):
        ref_w, ref_p, ref_l = dense_greedy_obs(w[r], hd, k)
        assert torch.equal(~res.mask[r], ref_p)
        torch.testing.assert_close(res.weight[r], ref_w, rtol=0, atol=ATOL)
        assert float(res.loss[r]) == pytest.approx(float(ref_l.sum()), rel=1e-9, abs=1e-12)
    assert ((~res.mask).sum(1) == k).all()
    assert (res.weight[~res.mask] == 0).all()


def test_row_scope_d64_equals_dense_greedy():
    w, h = problem(4, 64, seed=7, mix=0.2)
    res = obc(w, h, sparsity=0.5)
    hd = damped(h)
    for r in range(4):
        ref_w, ref_p, _ = dense_greedy_obs(w[r], hd, 32)
        assert torch.equal(~res.mask[r], ref_p)
        torch.testing.assert_close(res.weight[r], ref_w, rtol=0, atol=ATOL)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 4)]),
       st.integers(1, 3), st.integers(0, 2**16))
def test_nm_equals_dense_greedy(rows, nm, groups, seed):
    n, m = nm
    d = m * groups
    w, h = problem(rows, d, seed)
    res = obc(w, h, prune_n=n, prune_m=m)
    hd = damped(h)
    for r in range(rows):
        ref_w, ref_p, _ = dense_greedy_obs(w[r], hd, d * n // m, groups=(n, m))
        assert torch.equal(~res.mask[r], ref_p)
        torch.testing.assert_close(res.weight[r], ref_w, rtol=0, atol=ATOL)
    assert ((~res.mask).reshape(rows, groups, m).sum(2) == n).all()
    assert (res.weight[~res.mask] == 0).all()


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 5), st.integers(2, 10), st.sampled_from([0.2, 0.5, 0.8]),
       st.integers(0, 2**16))
def test_layer_scope_equals_dense_trace_selection(rows, d, sparsity, seed):
    """Global selection within the layer: the K smallest per-step losses of the full traces."""
    w, h = problem(rows, d, seed)
    res = obc(w, h, sparsity=sparsity, scope="layer", row_chunk=2)
    hd = damped(h)
    traces = torch.stack([dense_greedy_obs(w[r], hd, d)[2] for r in range(rows)])
    budget = prune_count(rows * d, sparsity)
    chosen = torch.sort(traces.reshape(-1), stable=True).indices[:budget]
    counts = torch.bincount(chosen // d, minlength=rows)
    assert int((~res.mask).sum()) == budget
    for r in range(rows):
        ref_w, ref_p, _ = dense_greedy_obs(w[r], hd, int(counts[r]))
        assert torch.equal(~res.mask[r], ref_p)
        torch.testing.assert_close(res.weight[r], ref_w, rtol=0, atol=ATOL)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 16), st.sampled_from([0.3, 0.5, 0.75]),
       st.sampled_from(["row", "layer"]), st.integers(0, 2**16))
def test_loss_is_quadratic_and_never_above_no_update(rows, d, sparsity, scope, seed):
    """OBC's result is the joint OBS optimum for its final mask, so it beats plain zeroing."""
    w, h = problem(rows, d, seed, mix=0.5)
    res = obc(w, h, sparsity=sparsity, scope=scope)
    hd = damped(h)
    torch.testing.assert_close(res.loss, 0.5 * quad(w - res.weight, hd), rtol=1e-9, atol=1e-12)
    no_update = quad(w - w * res.mask, hd)
    assert (quad(w - res.weight, hd) <= no_update * (1 + 1e-9) + 1e-12).all()
    n = d if scope == "row" else rows * d
    pruned = (~res.mask).sum(1) if scope == "row" else (~res.mask).sum()
    assert (pruned == prune_count(n, sparsity)).all()


def test_argument_checks():
    w, h = problem(2, 8, 0)
    with pytest.raises(ValueError, match="exactly one"):
        obc(w, h)
    with pytest.raises(ValueError, match="multiple of m"):
        obc(w, h, prune_n=2, prune_m=3)
    with pytest.raises(ValueError, match="scope"):
        obc(w, h, sparsity=0.5, scope="global")
    assert math.isclose(float(obc(w, h, sparsity=0.0).loss.sum()), 0.0)
