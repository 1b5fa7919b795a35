"""Static M-FAC against the dense float64 inverse and the paper's row-by-row recursion."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import curvprune
from curvprune import ConfigError, EstimatorStateError, NumericalError
from curvprune_mfac import MFACEstimator, StaticInverse
from curvprune_mfac.config import MFACConfig

from .conftest import dense_fisher, normwise_error, tol


def make(**options) -> MFACEstimator:
    options = {"dtype": "float64", "block_size": None, "blocks": "fixed", **options}
    return MFACEstimator(MFACConfig(**options))


@st.composite
def problems(draw, max_params=3, max_size=16, max_m=10):
    sizes = tuple(draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_params)))
    m = draw(st.integers(1, max_m))
    damping = draw(st.floats(1e-3, 10.0))
    # Gradient scales over four decades: cond(F) ≤ 1 + ‖G‖²/(m·λ) stays ≤ ~1e7, so the
    # float64 budget 8·(d + m)·eps·cond stays < 1e-6 and the checks keep their teeth.
    scale = draw(st.sampled_from([1e-2, 1e-1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2**16))
    block = draw(st.sampled_from([None, 1, 3, 8]))
    g = torch.Generator().manual_seed(seed)
    grads = scale * torch.randn(m, sum(sizes), generator=g, dtype=torch.float64)
    return sizes, grads, damping, block


@settings(max_examples=40)
@given(problem=problems(), n=st.integers(1, 3))
def test_static_matches_dense(problem, n):
    sizes, grads, damping, block = problem
    est = make(damping=damping, num_grads=grads.shape[0], block_size=block)
    est.setup(sizes)
    est.update(grads)
    fisher = dense_fisher(grads, sizes, block, damping)
    inverse = torch.linalg.inv(fisher)
    budget = tol(fisher, grads.shape[0], damping)
    v = torch.randn(n, sum(sizes), dtype=torch.float64)
    assert normwise_error(est.ihvp(v), v @ inverse, inverse, v) <= budget
    diag_err = (est.inverse_diagonal() - inverse.diagonal()).abs().max()
    assert float(diag_err) <= budget * float(torch.linalg.matrix_norm(inverse, ord=2))


@settings(max_examples=25)
@given(problem=problems(max_params=1, max_size=24, max_m=8))
def test_scaled_rows_are_the_papers_recursion(problem):
    """Row i of Ŵ = C⁻¹G/λ equals vᵢ/√denᵢ of M-FAC's recursion (Sec. 3.1), unblocked."""
    _, grads, damping, _ = problem
    m, d = grads.shape
    # The recursion, literally: F₀⁻¹ = I/λ, vᵢ = Fᵢ₋₁⁻¹gᵢ, denᵢ = m + gᵢᵀvᵢ.
    inv = torch.eye(d, dtype=torch.float64) / damping
    rows = []
    for g in grads:
        v = inv @ g
        den = m + g @ v
        rows.append(v / den.sqrt())
        inv = inv - torch.outer(v, v) / den
    static = StaticInverse.from_gradients_(grads.clone()[None], m, damping)
    fisher = dense_fisher(grads, (d,), None, damping)
    budget = tol(fisher, m, damping) * math.sqrt(float(torch.linalg.matrix_norm(inv, ord=2)))
    assert float((static.scaled[0] - torch.stack(rows)).abs().max()) <= budget


def test_state_is_m_by_d_and_no_dense_matrix():
    est = make(num_grads=5)
    est.setup([40, 60])
    est.update(torch.randn(5, 100, dtype=torch.float64))
    est.ihvp(torch.randn(100, dtype=torch.float64))
    assert tuple(est._static.scaled.shape) == (1, 5, 100)  # Ŵ, nothing d×d or d×m×m


def test_fewer_gradients_than_num_grads_is_exact_for_those_given():
    grads = torch.randn(3, 12, dtype=torch.float64)
    est = make(num_grads=10, damping=0.5)
    est.setup([12])
    est.update(grads)
    assert est.num_samples == 3
    inverse = torch.linalg.inv(dense_fisher(grads, (12,), None, 0.5))  # 1/3, not 1/10
    torch.testing.assert_close(est.inverse_diagonal(), inverse.diagonal(), rtol=1e-12, atol=0)


def test_zero_gradients_give_identity_over_damping_and_one_gradient_closed_form():
    est = make(num_grads=4, damping=0.25)
    est.setup([7])
    est.update(torch.zeros(4, 7, dtype=torch.float64))
    assert torch.equal(est.inverse_diagonal(), torch.full((7,), 4.0, dtype=torch.float64))
    g = torch.randn(7, dtype=torch.float64)
    one = make(num_grads=1, damping=0.25)
    one.setup([7])
    one.update(g[None])
    # F⁻¹ = I/λ − ggᵀ/(λ²(m + ‖g‖²/λ)) with m = 1.
    closed = torch.eye(7, dtype=torch.float64) / 0.25 - torch.outer(g, g) / (
        0.25**2 * (1 + g @ g / 0.25))
    torch.testing.assert_close(one.ihvp(torch.eye(7, dtype=torch.float64)), closed,
                               rtol=1e-12, atol=1e-12)


def test_float32_at_reference_damping_matches_float64():
    # λ = 1e-5 with gradients ~1e-3 (as for mini-batch loss gradients): cond(F) ≈ 1e2·d/m…
    # the memo measures 9e-8 – 4e-6 relative error for every form; 1e-4 leaves margin (§6.14).
    g = torch.Generator().manual_seed(0)
    grads = 1e-3 * torch.randn(32, 2000, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2000, generator=g, dtype=torch.float64)
    results = {}
    for dtype in ("float32", "float64"):
        est = MFACEstimator(MFACConfig(num_grads=32, dtype=dtype, block_size=None))
        est.setup([1000, 1000])
        est.update(grads)
        results[dtype] = (est.ihvp(v).double(), est.inverse_diagonal().double())
    (u32, d32), (u64, d64) = results["float32"], results["float64"]
    assert float((u32 - u64).abs().max() / u64.abs().max()) <= 1e-4
    assert float((d32 - d64).abs().max() / d64.abs().max()) <= 1e-4


def test_bad_input():
    est = make(num_grads=4)
    est.setup([3, 2])
    with pytest.raises(EstimatorStateError, match="no gradients yet"):
        est.ihvp(torch.zeros(5, dtype=torch.float64))
    good = torch.randn(2, 5, dtype=torch.float64)
    est.update(good)
    bad = good.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(NumericalError, match=r"rows \[1\].*unchanged"):
        est.update(bad)
    assert est.num_samples == 2
    with pytest.raises(ConfigError, match="num_grads=4"):
        est.update(torch.randn(3, 5, dtype=torch.float64))
    fresh = make(num_grads=4)
    fresh.setup([3, 2])
    fresh.update(good)
    v = torch.randn(5, dtype=torch.float64)
    assert torch.equal(est.ihvp(v), fresh.ihvp(v))  # the rejected chunks left no trace
    with pytest.raises(EstimatorStateError, match="after it has been queried"):
        est.update(good)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"window": 0}, "window must be >= 1, got 0"),
     ({"damping": 0}, "damping must be > 0, got 0"),
     ({"damping": -1}, "damping must be > 0, got -1"),
     ({"algorithm": "lu"}, "algorithm")],
)
def test_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        curvprune.create("estimator", "mfac", **options)


def test_a_gram_that_lost_definiteness_is_a_numerical_error():
    import curvprune
    from curvprune_mfac.static import capacitance_cholesky

    # a float32 Gram with round-off eigenvalue -1, amplified by 1/λ past m: what tiny damping does
    gram = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(curvprune.NumericalError, match="raise \\[estimator\\] damping"):
        capacitance_cholesky(gram, 2, 1e-3)
    capacitance_cholesky(gram, 2, 1.0)  # 2·I + K has eigenvalues 5 and 1: fine
