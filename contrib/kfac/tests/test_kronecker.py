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


def _failing_eigh(fail_when):
    """torch.linalg.eigh that raises LinAlgError where ``fail_when(matrix)`` (as LAPACK's float32
    syevd does on some rank-deficient factors; no small matrix reproduces that reliably)."""
    real = torch.linalg.eigh

    def eigh(matrix, *args, **kwargs):
        if fail_when(matrix):
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(matrix, *args, **kwargs)

    return eigh


def _check_decomposition(stack, values, vectors, rtol):
    rebuilt = vectors.double() @ torch.diag_embed(values.double()) @ vectors.double().mT
    scale = torch.linalg.matrix_norm(stack.double(), ord=2).amax()
    assert float((rebuilt - stack.double()).abs().amax()) <= rtol * float(scale)
    eye = torch.eye(stack.shape[-1], dtype=torch.float64)
    assert float((vectors.double().mT @ vectors.double() - eye).abs().amax()) <= rtol * 10


def test_eigh_falls_back_per_matrix_and_to_float64(monkeypatch):
    from curvprune_kfac.kronecker import symmetric_eigh

    gen = torch.Generator().manual_seed(0)
    stack = torch.stack([_psd(12, 3, gen), _psd(12, 12, gen), _psd(12, 1, gen)]).float()
    # the batch fails in float32, and so does the rank-1 matrix alone: it must come from float64
    rank_one = stack[2]
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(
        lambda m: m.dtype == torch.float32 and (m.dim() == 3 or torch.equal(m, rank_one))))
    values, vectors = symmetric_eigh(stack)
    assert values.dtype == vectors.dtype == torch.float32
    _check_decomposition(stack, values, vectors, rtol=1e-5)  # float32 results: ~10 eps32


def test_eigh_shifts_a_matrix_that_fails_in_float64_too(monkeypatch):
    from curvprune_kfac.kronecker import symmetric_eigh

    gen = torch.Generator().manual_seed(1)
    stack = _psd(10, 2, gen).unsqueeze(0)
    norm = float(torch.linalg.matrix_norm(stack[0]))
    # fails unless the diagonal was shifted (float64, unshifted input fails too)
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(
        lambda m: m.dim() == 3 or torch.allclose(m.double(), stack[0], rtol=0, atol=0)))
    values, vectors = symmetric_eigh(stack)
    _check_decomposition(stack, values, vectors, rtol=50 * _EPS64 * max(norm, 1.0))
    assert float(values.min()) > -1e-12 * norm  # PSD up to round-off
    assert torch.equal(stack, _psd(10, 2, torch.Generator().manual_seed(1)).unsqueeze(0)), \
        "the input must not be modified"


def test_inverse_survives_an_eigh_failure(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    factors = [(_psd(3, 2, gen), _psd(4, 1, gen)), (_psd(3, 3, gen), _psd(4, 2, gen))]
    reference = torch.linalg.inv(_dense(factors, 0.1))
    monkeypatch.setattr(torch.linalg, "eigh", _failing_eigh(lambda m: m.dim() == 3))
    inverse = KroneckerInverse(factors, 0.1, torch.float64)
    assert_allclose(inverse.diagonal(), reference.diagonal(), rtol=1e-10)


def _dense_pi(factors, damping):
    """Martens & Grosse (2015) Sec. 6.3, written from the definition: per layer
    π = sqrt((tr A/dim A)/(tr G/dim G)) and the block (G + √λ/π·I) ⊗ (A + π√λ·I)."""
    blocks = []
    for g, a in factors:
        pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
        root = damping**0.5
        eye_g = torch.eye(g.shape[0], dtype=torch.float64)
        eye_a = torch.eye(a.shape[0], dtype=torch.float64)
        blocks.append(torch.kron(g + root / pi * eye_g, a + pi * root * eye_a))
    return torch.block_diag(*blocks)


@settings(max_examples=25, deadline=None)
@given(problems())
def test_pi_split_matches_the_dense_damped_factors(problem):
    factors, damping, gen = problem
    inv = KroneckerInverse(factors, damping, torch.float64, split="pi")
    fisher = _dense_pi(factors, damping)
    dense_inv = torch.linalg.inv(fisher)
    d = fisher.shape[0]
    rtol = 16 * d * _EPS64 * float(torch.linalg.cond(fisher))
    scale = float(torch.linalg.matrix_norm(dense_inv, ord=2))
    v = torch.randn(3, d, dtype=torch.float64, generator=gen)
    assert_allclose(inv.solve(v), v @ dense_inv, rtol=rtol, atol=rtol * scale * 4, what="solve")
    assert_allclose(inv.diagonal(), dense_inv.diagonal(), rtol=rtol, atol=rtol * scale, what="diag")
    offsets = torch.tensor([0, *inv.sizes]).cumsum(0).tolist()
    width = max(inv.sizes)
    idx = torch.tensor([list(range(s, e)) + [-1] * (width - (e - s))
                        for s, e in zip(offsets, offsets[1:])])
    got = inv.entries(idx)
    valid = (idx >= 0)[:, :, None] & (idx >= 0)[:, None, :]
    safe = idx.clamp_min(0)
    want = dense_inv[safe[:, :, None], safe[:, None, :]]
    assert_allclose(got[valid], want[valid], rtol=rtol, atol=rtol * scale, what="entries")


def test_pi_split_differs_from_exact_and_guards_a_dead_factor():
    gen = torch.Generator().manual_seed(1)
    g, a = 100 * _psd(3, 3, gen), _psd(2, 2, gen)  # unbalanced traces: π far from 1
    exact = KroneckerInverse([(g, a)], 0.1, torch.float64)
    pi = KroneckerInverse([(g, a)], 0.1, torch.float64, split="pi")
    assert not torch.allclose(exact.diagonal(), pi.diagonal(), rtol=1e-3)
    # (G + cI)⊗(A + c′I) = G⊗A + c′G⊗I + cI⊗A + λI with cc′ = λ: F_pi ⪰ F_exact, smaller inverse
    assert bool((pi.diagonal() <= exact.diagonal() * (1 + 1e-12)).all())
    zero = KroneckerInverse([(torch.zeros(3, 3, dtype=torch.float64), a)], 0.1, torch.float64,
                            split="pi")
    expected = torch.linalg.inv(torch.kron(0.1**0.5 * torch.eye(3, dtype=torch.float64),
                                           a + 0.1**0.5 * torch.eye(2, dtype=torch.float64)))
    assert torch.allclose(zero.diagonal(), expected.diagonal())
