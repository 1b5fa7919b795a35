"""Dynamic M-FAC: after any updates in any chunks, equals static on the window and the dense inverse."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune_mfac import MFACEstimator, SlidingWindow
from curvprune_mfac.config import MFACConfig

from .conftest import dense_fisher, normwise_error, tol


def make(**options) -> MFACEstimator:
    options = {"dtype": "float64", "block_size": None, "blocks": "fixed", **options}
    return MFACEstimator(MFACConfig(**options))


@settings(max_examples=40)
@given(
    sizes=st.lists(st.integers(1, 10), min_size=1, max_size=3).map(tuple),
    window=st.integers(1, 6),
    total=st.integers(1, 20),
    cuts=st.lists(st.integers(0, 20), max_size=5),
    damping=st.floats(1e-2, 10.0),
    block=st.sampled_from([None, 2, 5]),
    seed=st.integers(0, 2**16),
)
def test_window_equals_static_recompute_and_dense(sizes, window, total, cuts, damping, block,
                                                  seed):
    g = torch.Generator().manual_seed(seed)
    grads = torch.randn(total, sum(sizes), generator=g, dtype=torch.float64)
    dynamic = make(algorithm="dynamic", window=window, num_grads=total, damping=damping,
                   block_size=block)
    dynamic.setup(sizes)
    bounds = sorted({0, total, *(c for c in cuts if c <= total)})
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        dynamic.update(grads[start:stop])
        dynamic.ihvp(grads[0])  # queries between updates must not disturb the window
    last = grads[-window:]
    assert dynamic.num_samples == last.shape[0]
    static = make(algorithm="static", num_grads=last.shape[0], damping=damping, block_size=block)
    static.setup(sizes)
    static.update(last)
    fisher = dense_fisher(last, sizes, block, damping)  # averaged over the gradients held
    inverse = torch.linalg.inv(fisher)
    budget = tol(fisher, window, damping)
    v = torch.randn(2, sum(sizes), generator=g, dtype=torch.float64)
    got = dynamic.ihvp(v)
    assert normwise_error(got, v @ inverse, inverse, v) <= budget
    assert normwise_error(got, static.ihvp(v), inverse, v) <= budget
    scale = budget * float(torch.linalg.matrix_norm(inverse, ord=2))
    assert float((dynamic.inverse_diagonal() - inverse.diagonal()).abs().max()) <= scale


def test_zero_padded_window_scales_by_the_full_window():
    """The optimizer's convention: F = λI + (1/m)·Σ over the real gradients, m = window."""
    grads = torch.randn(2, 6, dtype=torch.float64)
    ring = SlidingWindow(1, 5, 6, damping=0.1, dtype=torch.float64, zero_padded=True)
    ring.push(grads[None])
    inverse = torch.linalg.inv(dense_fisher(grads, (6,), None, 0.1, scale=5))
    x = torch.randn(3, 1, 6, dtype=torch.float64)
    torch.testing.assert_close(ring.ihvp(x)[:, 0], x[:, 0] @ inverse, rtol=1e-12, atol=1e-12)


def test_window_holds_only_the_last_gradients():
    ring = SlidingWindow(1, 3, 4, damping=1.0, dtype=torch.float64)
    grads = torch.randn(7, 4, dtype=torch.float64)
    for row in grads:
        ring.push(row[None, None])
    assert ring.count == 3 and ring.seen == 7
    assert sorted(map(tuple, ring.grads[0].tolist())) == sorted(map(tuple, grads[-3:].tolist()))
    # Entries are whole dot products (never accumulated), so they match a recompute up to the
    # summation order of a 4-term dot product: ≤ 4·eps·Σ|g_i||g_j|.
    window = ring.grads[0]
    bound = 4 * torch.finfo(torch.float64).eps * (window.abs() @ window.abs().T)
    assert bool(((ring.gram[0] - window @ window.T).abs() <= bound).all())
