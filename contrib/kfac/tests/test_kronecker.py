"""KroneckerInverse against dense float64 inverses of λI + blockdiag(G ⊗ A) (no curvlinops)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune.testing.dense import assert_allclose
from curvprune_kfac import KroneckerInverse

_EPS64 = torch.finfo(torch.float64).eps


def _psd(n: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, rank, dtype=torch.float64, generator=generator)
    return x @ x.T / rank


@st.composite
def problems(draw):
    """Layers with factor shapes drawn from a small set, so equal shapes get stacked."""
    shapes = draw(st.lists(st.sampled_from([(1, 1), (2, 3), (3, 1), (3, 2), (4, 4)]),
                           min_size=1, max_size=5))
    seed = draw(st.integers(0, 2**16))
    damping = draw(st.floats(1e-3, 10.0))
    gen = torch.Generator().manual_seed(seed)
    # rank 1..n: singular factors included (rank-deficient covariances are the common case)
    factors = [(_psd(o, draw(st.integers(1, o)), gen), _psd(i, draw(st.integers(1, i)), gen))
               for o, i in shapes]
    return factors, damping, gen


def _dense(factors, damping):
    blocks = [torch.kron(g, a) for g, a in factors]
    return torch.block_diag(*blocks) + damping * torch.eye(sum(b.shape[0] for b in blocks),
                                                           dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_queries_match_the_dense_inverse(problem):
    factors, damping, gen = problem
    inv = KroneckerInverse(factors, damping, torch.float64)
    fisher = _dense(factors, damping)
    dense_inv = torch.linalg.inv(fisher)
    d = fisher.shape[0]
    # eigh and GEMMs are backward stable: error ≲ c·d·eps·cond(F) relative to ‖F⁻¹‖₂.
    rtol = 16 * d * _EPS64 * float(torch.linalg.cond(fisher))
    scale = float(torch.linalg.matrix_norm(dense_inv, ord=2))
    v = torch.randn(3, d, dtype=torch.float64, generator=gen)
    assert_allclose(inv.solve(v), v @ dense_inv, rtol=rtol, atol=rtol * scale * 4, what="solve")
    assert_allclose(inv.diagonal(), dense_inv.diagonal(), rtol=rtol, atol=rtol * scale, what="diag")
    # Every pair of coordinates within each parameter, padded rows mixed in.
    offsets = torch.tensor([0, *inv.sizes]).cumsum(0).tolist()
    width = max(inv.sizes)
    rows = [list(range(s, e)) + [-1] * (width - (e - s)) for s, e in zip(offsets, offsets[1:])]
    idx = torch.tensor(rows)
    got = inv.entries(idx)
    valid = (idx >= 0)[:, :, None] & (idx >= 0)[:, None, :]
    safe = idx.clamp_min(0)
    want = dense_inv[safe[:, :, None], safe[:, None, :]]
    assert_allclose(got[valid], want[valid], rtol=rtol, atol=rtol * scale, what="entries")


def test_float32_within_its_conditioning():
    gen = torch.Generator().manual_seed(0)
    factors = [(_psd(3, 3, gen), _psd(4, 2, gen)), (_psd(3, 3, gen), _psd(4, 4, gen)),
               (_psd(5, 2, gen), _psd(1, 1, gen))]
    fisher = _dense(factors, 0.1)
    inv32 = KroneckerInverse([(g.float(), a.float()) for g, a in factors], 0.1, torch.float32)
    dense_inv = torch.linalg.inv(fisher)
    rtol = 16 * fisher.shape[0] * torch.finfo(torch.float32).eps * float(torch.linalg.cond(fisher))
    assert rtol < 0.05  # the check has teeth
    scale = float(torch.linalg.matrix_norm(dense_inv, ord=2))
    v = torch.randn(2, fisher.shape[0], dtype=torch.float64, generator=gen)
    out = inv32.solve(v.float())
    assert out.dtype == torch.float32
    assert_allclose(out.double(), v @ dense_inv, rtol=rtol, atol=4 * rtol * scale, what="float32 solve")
    assert_allclose(inv32.diagonal().double(), dense_inv.diagonal(), rtol=rtol, atol=rtol * scale,
                    what="float32 diag")


def test_rows_across_parameters_are_refused():
    gen = torch.Generator().manual_seed(1)
    inv = KroneckerInverse([(_psd(2, 2, gen), _psd(2, 2, gen))] * 2, 1.0, torch.float64)
    try:
        inv.entries(torch.tensor([[0, 5]]))
    except ValueError as exc:
        assert "one parameter" in str(exc)
    else:
        raise AssertionError("a row across two parameters was accepted")
