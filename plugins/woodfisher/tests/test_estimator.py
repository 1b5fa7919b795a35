"""The woodfisher estimator against a dense float64 inverse of the block-diagonal damped Fisher.

Tolerances, relative to ‖F⁻¹‖₂ (``ref.relative_error``), for inputs exact in the working dtype:

* ``gram``: Cholesky and triangular solves are backward stable, so the forward error is
  ≲ c·B·eps·cond(F); summing the Gram matrix adds ≲ m·eps·cond(F).
* ``woodbury``: the recursion starts at λ⁻¹I and subtracts rank-1 terms of that size, so each
  of its m steps leaves an absolute error ≲ eps·λ⁻¹, i.e. eps·λ_min(F)/λ relative to
  ‖F⁻¹‖₂ = 1/λ_min(F) (a cancellation: 1×1, g = 15, λ = 1 loses 238 ulps). Times cond(F) for the
  propagation, this is eps·‖F‖₂/λ, which also bounds cond(F) (λ_min(F) ≥ λ).

So comparisons allow 4·(d + m)·eps·cond(F) for ``gram`` and 4·(d + m)·eps·‖F‖₂/λ for
``woodbury`` (and when comparing the two). Any real bug (a wrong 1/m, a leaked block, a missed
gradient) gives an O(1) error, orders of magnitude above these bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import curvprune
from curvprune import BlockLayout, ConfigError, EstimatorStateError, NumericalError
from curvprune_woodfisher import WoodFisherConfig, WoodFisherEstimator, plugin
from curvprune_woodfisher import inverse as inverse_module
from curvprune_woodfisher.estimator import AUTO_WOODBURY_RATIO, choose_algorithm

ALGORITHMS = ("woodbury", "gram")

# Only this plugin (and the builtins): other installed plugins neither slow nor break these tests.
HOST = curvprune.get_plugin_manager(autoload=False, plugins=[("woodfisher", plugin)])


def create(kind: str, name: str, **options) -> WoodFisherEstimator:
    """:func:`curvprune.create` through the registry, so config structuring is exercised."""
    return curvprune.create(kind, name, host=HOST, **options)


class Problem(NamedTuple):
    sizes: tuple[int, ...]
    block_size: int | None
    damping: float
    grads: Tensor  # float64 [m, d]

    @property
    def d(self) -> int:
        return sum(self.sizes)

    @property
    def m(self) -> int:
        return int(self.grads.shape[0])


@st.composite
def problems(draw: st.DrawFn, *, max_grads: int = 10, log_damping: tuple[float, float] = (-3, 1),
             log_scale: tuple[float, float] = (-2, 2), dtype: torch.dtype = torch.float64
             ) -> Problem:
    """Sizes 1-12 (1-4 parameters), block None or 1-16 (wider than some parameters), damping,
    m gradients of a drawn scale; half the time with repeated rows (rank-deficient Gram)."""
    sizes = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=4)))
    block_size = draw(st.none() | st.integers(1, 16))
    damping = 10 ** draw(st.floats(*log_damping))
    m = draw(st.integers(1, max_grads))
    scale = 10 ** draw(st.floats(*log_scale))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    grads = (torch.randn(m, sum(sizes), generator=gen, dtype=torch.float64) * scale).to(dtype)
    if draw(st.booleans()):
        grads[m // 2:] = grads[: m - m // 2].clone()
    return Problem(sizes, block_size, damping, grads.to(torch.float64))


def fitted(problem: Problem, algorithm: str, dtype: str = "float64",
           chunks: list[int] | None = None) -> WoodFisherEstimator:
    est = create("estimator", "woodfisher", algorithm=algorithm, dtype=dtype,
                 block_size=problem.block_size, damping=problem.damping, num_grads=problem.m)
    est.setup(problem.sizes)
    cuts = [0, *(chunks or []), problem.m]
    for start, stop in zip(cuts, cuts[1:], strict=False):
        est.update(problem.grads[start:stop])
    return est


def tolerance(ref, problem: Problem, algorithm: str = "woodbury",
              dtype: torch.dtype = torch.float64) -> float:
    """The module docstring's bound; ``woodbury``'s also covers comparisons with ``gram``."""
    fisher = ref.dense_fisher(problem.grads, problem.sizes, problem.block_size, problem.damping)
    if algorithm == "gram":
        amplification = ref.condition(fisher)
    else:
        amplification = float(torch.linalg.matrix_norm(fisher, ord=2)) / problem.damping
    return 4 * (problem.d + problem.m) * torch.finfo(dtype).eps * amplification


def dense_inverse(ref, problem: Problem) -> Tensor:
    fisher = ref.dense_fisher(problem.grads, problem.sizes, problem.block_size, problem.damping)
    return torch.linalg.inv(fisher)


# -- exactness against the dense inverse -----------------------------------------------------------
@settings(max_examples=60)
@given(problem=problems(), algorithm=st.sampled_from(ALGORITHMS))
def test_equals_dense_inverse(ref, problem: Problem, algorithm: str) -> None:
    est = fitted(problem, algorithm)
    expected = dense_inverse(ref, problem)
    tol = tolerance(ref, problem, algorithm)
    eye = torch.eye(problem.d, dtype=torch.float64)
    assert ref.relative_error(est.ihvp(eye), expected) <= tol
    diag = est.inverse_diagonal()
    assert ref.relative_error(torch.diag(diag), torch.diag(expected.diagonal())) <= tol
    assert bool((diag > 0).all())
    assert est.num_samples == problem.m


@settings(max_examples=40)
@given(problem=problems(log_damping=(-1, 1), log_scale=(-1, 0), dtype=torch.float32,
                        max_grads=16))
def test_woodbury_and_gram_agree_in_float32(ref, problem: Problem) -> None:
    # Inputs are float32-representable; damping >= 0.1 and |g| <~ 4 keep ‖F‖/λ below ~1e4, so
    # each float32 result is within the woodbury bound of the exact inverse and their difference
    # within twice that: well below 1 (≈1e-1 at the extreme, ≈1e-4 typically).
    woodbury = fitted(problem, "woodbury", dtype="float32")
    gram = fitted(problem, "gram", dtype="float32")
    eye = torch.eye(problem.d)
    assert woodbury.ihvp(eye).dtype == gram.ihvp(eye).dtype == torch.float32
    tol = 2 * tolerance(ref, problem, "woodbury", torch.float32)
    assert ref.relative_error(woodbury.ihvp(eye), gram.ihvp(eye).double()) <= tol
    expected = dense_inverse(ref, problem)
    assert ref.relative_error(gram.ihvp(eye), expected) <= tolerance(ref, problem, "gram",
                                                                     torch.float32)


def test_block_larger_than_every_parameter_is_the_parameter(ref) -> None:
    gen = torch.Generator().manual_seed(0)
    problem = Problem((3, 5, 2), 100, 0.1, torch.randn(6, 10, generator=gen, dtype=torch.float64))
    for algorithm in ALGORITHMS:
        est = fitted(problem, algorithm)
        assert est.block_layout.lengths.tolist() == [3, 5, 2]
        got = est.ihvp(torch.eye(10, dtype=torch.float64))
        assert ref.relative_error(got, dense_inverse(ref, problem)) <= tolerance(ref, problem,
                                                                                algorithm)


def test_limits_zero_and_single_gradient() -> None:
    # m zero gradients: F = λI. One gradient g: F⁻¹ = I/λ − ggᵀ/(λ²(m + ‖g‖²/λ)) per block.
    damping, d = 0.5, 6
    for algorithm in ALGORITHMS:
        est = create("estimator", "woodfisher", algorithm=algorithm, dtype="float64",
                     block_size=None, damping=damping, num_grads=3)
        est.setup([d])
        est.update(torch.zeros(3, d, dtype=torch.float64))
        # (1/√λ)² rounds: a few ulps, not exact.
        torch.testing.assert_close(est.inverse_diagonal(), torch.full(
            (d,), 1 / damping, dtype=torch.float64), rtol=4 * 2.0**-52, atol=0)
        g = torch.linspace(-1, 2, d, dtype=torch.float64)
        one = create("estimator", "woodfisher", algorithm=algorithm, dtype="float64",
                     block_size=None, damping=damping, num_grads=1)
        one.setup([d])
        one.update(g[None])
        closed = torch.eye(d, dtype=torch.float64) / damping - torch.outer(g, g) / (
            damping**2 * (1 + g @ g / damping)
        )
        torch.testing.assert_close(one.ihvp(torch.eye(d, dtype=torch.float64)), closed,
                                   rtol=1e-13, atol=1e-13)


# -- streaming, order, padding ---------------------------------------------------------------------
@settings(max_examples=40)
@given(problem=problems(), data=st.data())
def test_streaming_in_chunks_equals_one_batch(ref, problem: Problem, data) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, problem.m), max_size=4), label="cuts"))
    # The recursion visits the same gradients in the same order whatever the chunks: identical.
    whole, chunked = fitted(problem, "woodbury"), fitted(problem, "woodbury", chunks=cuts)
    assert torch.equal(whole.inverse_diagonal(), chunked.inverse_diagonal())
    eye = torch.eye(problem.d, dtype=torch.float64)
    assert torch.equal(whole.ihvp(eye), chunked.ihvp(eye))
    # Gram sums regroup with the chunks: equal up to round-off.
    whole, chunked = fitted(problem, "gram"), fitted(problem, "gram", chunks=cuts)
    assert ref.relative_error(chunked.ihvp(eye), whole.ihvp(eye)) <= tolerance(ref, problem,
                                                                                  "gram")


@settings(max_examples=40)
@given(problem=problems(), data=st.data(), algorithm=st.sampled_from(ALGORITHMS))
def test_gradient_order_does_not_matter(ref, problem: Problem, data, algorithm: str) -> None:
    order = data.draw(st.permutations(range(problem.m)), label="order")
    shuffled = problem._replace(grads=problem.grads[list(order)])
    eye = torch.eye(problem.d, dtype=torch.float64)
    first, second = fitted(problem, algorithm), fitted(shuffled, algorithm)
    assert ref.relative_error(second.ihvp(eye), first.ihvp(eye)) <= tolerance(ref, problem,
                                                                               algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_padding_never_leaks(ref, algorithm: str) -> None:
    # sizes (5, 3), block 4: blocks of 4, 1 and 3 weights padded to width 4. Gradients ~1e3 make
    # any coupling to a padding slot visible.
    gen = torch.Generator().manual_seed(1)
    sizes, damping = (5, 3), 1e-2
    grads = 1e3 * torch.randn(7, 8, generator=gen, dtype=torch.float64)
    together = fitted(Problem(sizes, 4, damping, grads), algorithm)
    # The padding slots of the state stay exactly λ⁻¹·I: never coupled to a real coordinate.
    blocks = together.block_layout
    pad = ~blocks.valid()
    inverse = together._ready_inverse()
    assert torch.equal(inverse.diagonal(dim1=-2, dim2=-1)[pad],
                       torch.full((int(pad.sum()),), 1 / damping, dtype=torch.float64))
    off = ~torch.eye(4, dtype=torch.bool)
    coupling = (pad[:, :, None] | pad[:, None, :]) & off
    assert torch.equal(inverse[coupling], torch.zeros(int(coupling.sum()), dtype=torch.float64))
    # ... and each block's inverse is what that block alone gives, without padding.
    for (lo, hi), size in (((0, 4), 4), ((4, 5), 1), ((5, 8), 3)):
        alone = fitted(Problem((size,), None, damping, grads[:, lo:hi].contiguous()), algorithm)
        v = torch.zeros(8, dtype=torch.float64)
        v[lo:hi] = torch.arange(1.0, hi - lo + 1, dtype=torch.float64)
        out = together.ihvp(v)
        assert torch.equal(out[:lo], torch.zeros(lo, dtype=torch.float64))
        assert torch.equal(out[hi:], torch.zeros(8 - hi, dtype=torch.float64))
        torch.testing.assert_close(out[lo:hi], alone.ihvp(v[lo:hi]), rtol=1e-10, atol=0)


# -- inverse_columns -------------------------------------------------------------------------------
@settings(max_examples=40)
@given(problem=problems(), data=st.data(), algorithm=st.sampled_from(ALGORITHMS))
def test_inverse_columns_gathers_within_blocks(ref, problem: Problem, data, algorithm) -> None:
    est = fitted(problem, algorithm)
    ids = ref.block_ids(problem.sizes, problem.block_size)
    rows = []
    for _ in range(data.draw(st.integers(1, 3), label="rows")):
        block = data.draw(st.sampled_from(sorted(set(ids.tolist()))), label="block")
        members = (ids == block).nonzero().squeeze(1).tolist()
        rows.append(data.draw(st.lists(st.sampled_from(members), unique=True, max_size=4),
                              label="members"))
    k = max(1, *map(len, rows))
    idx = torch.tensor([r + [-1] * (k - len(r)) for r in rows], dtype=torch.long)
    out = est.inverse_columns(idx)
    inverse = dense_inverse(ref, problem)
    safe = idx.clamp_min(0)
    expected = inverse[safe[:, :, None], safe[:, None, :]]
    valid = (idx >= 0)[:, :, None] & (idx >= 0)[:, None, :]
    eye = torch.eye(k, dtype=torch.float64).expand_as(out)
    assert torch.equal(out[~valid], eye[~valid])
    if bool(valid.any()):
        error = float((out - expected)[valid].abs().max())
        scale = float(torch.linalg.matrix_norm(inverse, ord=2))
        assert error / scale <= tolerance(ref, problem, algorithm)


def test_inverse_columns_rejects_rows_across_blocks() -> None:
    est = fitted(Problem((4, 4), 4, 1.0, torch.ones(2, 8, dtype=torch.float64)), "gram")
    with pytest.raises(ValueError, match="one diagonal block"):
        est.inverse_columns(torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match=r"\[-1, 8\)"):  # checked by the core's wrapper
        est.inverse_columns(torch.tensor([[8, -1]]))


# -- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [({"damping": 0.0}, "damping must be > 0, got 0.0 @ estimator.damping"),
     ({"damping": -1}, "damping must be > 0, got -1.0 @ estimator.damping"),
     ({"block_size": 0}, "block_size must be >= 1, got 0 @ estimator.block_size"),
     ({"num_grads": 0}, "num_grads must be >= 1, got 0 @ estimator.num_grads"),
     ({"algorithm": "cholesky"}, "@ estimator.algorithm")],
)
def test_bad_config_is_a_config_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        create("estimator", "woodfisher", **options)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_queries_before_any_update_raise(algorithm: str) -> None:
    est = create("estimator", "woodfisher", algorithm=algorithm, num_grads=2)
    with pytest.raises(EstimatorStateError, match="setup"):
        est.inverse_diagonal()
    est.setup([3, 2])
    est.update(torch.zeros(0, 5))
    for query in (est.inverse_diagonal, lambda: est.ihvp(torch.ones(5)),
                  lambda: est.inverse_columns(torch.tensor([[0, 1]]))):
        with pytest.raises(EstimatorStateError, match="no gradients"):
            query()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradients_raise_and_change_nothing(algorithm: str, bad: float) -> None:
    gen = torch.Generator().manual_seed(2)
    good = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    poisoned = good[:2].clone()
    poisoned[1, 6] = bad  # parameter 1 of sizes (4, 5)
    est = create("estimator", "woodfisher", algorithm=algorithm, dtype="float64", block_size=3,
                 num_grads=4)
    est.setup([4, 5])
    est.update(good[:2])
    with pytest.raises(NumericalError, match=r"parameter 1 .*flat index 6, row 1"):
        est.update(poisoned)
    assert est.num_samples == 2
    est.update(good[2:])
    clean = create("estimator", "woodfisher", algorithm=algorithm, dtype="float64", block_size=3,
                   num_grads=4)
    clean.setup([4, 5])
    clean.update(good[:2])
    clean.update(good[2:])
    assert torch.equal(est.inverse_diagonal(), clean.inverse_diagonal())


def test_woodbury_needs_exactly_num_grads() -> None:
    est = create("estimator", "woodfisher", algorithm="woodbury", num_grads=3)
    est.setup([4])
    est.update(torch.ones(2, 4))
    with pytest.raises(ConfigError, match="saw 2 gradients but num_grads = 3"):
        est.inverse_diagonal()
    before = est._inverse.clone()
    with pytest.raises(ConfigError, match="got 4 gradients but num_grads = 3"):
        est.update(torch.ones(2, 4))
    assert torch.equal(est._inverse, before) and est.num_samples == 2
    est.update(torch.ones(1, 4))
    assert est.inverse_diagonal().shape == (4,)


def test_gram_accepts_any_m_but_no_update_after_query(ref) -> None:
    grads = torch.randn(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    est = create("estimator", "woodfisher", algorithm="gram", dtype="float64", num_grads=64,
                 block_size=4, damping=0.1)
    est.setup([6])
    est.update(grads)
    expected = torch.linalg.inv(ref.dense_fisher(grads, (6,), 4, 0.1))
    torch.testing.assert_close(est.ihvp(torch.eye(6, dtype=torch.float64)), expected)
    with pytest.raises(EstimatorStateError, match="call setup"):
        est.update(grads)


def test_float32_blocks_that_fail_cholesky_fall_back_to_the_psd_inverse(ref) -> None:
    # Block 0: rank-1 gradients of size 1e4 with λ = 1e-4. In float32, λ vanishes next to the
    # Gram diagonal (1e8), λI + G/m is numerically singular and the Cholesky breaks down; block
    # 1 is benign. The Gram here is exact up to the rounding of 1e8 (all entries equal, so it
    # stays rank-1 PSD), so the clamped-eigenvalue fallback must return the exact inverse up to
    # the final rounding to float32, and block 1 the usual 4·(d + m)·eps₃₂·cond(F₁), both
    # relative to ‖F⁻¹‖₂ = 1/λ: 4·10·eps₃₂·4 bounds both.
    grads = torch.zeros(2, 8, dtype=torch.float64)
    grads[:, :4] = 1e4
    grads[0, 4:] = torch.tensor([0.5, -1.0, 2.0, 0.25]) * 1e-2  # cond(F₁) ≈ 3.7
    est = create("estimator", "woodfisher", algorithm="gram", block_size=4, damping=1e-4)
    est.setup([8])
    est.update(grads)
    got = est.ihvp(torch.eye(8))
    expected = torch.linalg.inv(ref.dense_fisher(grads, (8,), 4, 1e-4))
    # cond(F₀) = 4e12 defeats even a float64 dense inverse (error ~4e-4): use the closed form
    # F₀⁻¹ = I/λ − uuᵀ/(λ(λ + ‖u‖²)), u = 1e4·(1, 1, 1, 1), for block 0.
    u = grads[0, :4]
    expected[:4, :4] = torch.eye(4, dtype=torch.float64) / 1e-4 - torch.outer(u, u) / (
        1e-4 * (1e-4 + u @ u)
    )
    assert got.dtype == torch.float32
    assert ref.relative_error(got, expected) <= 4 * 10 * torch.finfo(torch.float32).eps * 4
    assert bool((est.inverse_diagonal() > 0).all())


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("per_piece", [True, False])
def test_damped_block_inverse_in_pieces_matches_the_dense_inverse(monkeypatch, threads,
                                                                  per_piece) -> None:
    # 7 blocks of 4 in pieces of 2 blocks (so 4 pieces, shared by 2 worker threads when
    # threads = 2), float32; blocks 1 and 4 are λI + uuᵀ with u = 1e4·(1, 1, 1, 1) and
    # λ = 1e-4, whose float32 Cholesky fails (as in the test above), so they take the float64
    # clamped-eigenvalue path and must give the closed form; every other block must be
    # (λI + G/m)⁻¹ (float64 reference) to float32 round-off times a small condition number.
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(7, 6, 4, generator=gen, dtype=torch.float64)
    grads[1] = grads[4] = 1e4
    gram = grads.mT @ grads
    expected = torch.linalg.inv_ex(gram / 6 + 1e-4 * torch.eye(4, dtype=torch.float64))[0]
    u = grads[1, 0]
    exact = torch.eye(4, dtype=torch.float64) / 1e-4 - torch.outer(u, u) / (
        1e-4 * (1e-4 + u @ u))
    expected[1] = expected[4] = exact
    gram = gram.float()
    monkeypatch.setattr(inverse_module, "INVERT_PIECE_BYTES", 2 * 16 * 8)
    if not per_piece:  # the off-CPU form: torch.where, one host sync at the end
        original = inverse_module._invert_pieces
        monkeypatch.setattr(inverse_module, "_invert_pieces",
                            lambda g, p: original(g, p, per_piece=False))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = inverse_module.damped_block_inverse(gram.clone(), 6, 1e-4)
        assert torch.get_num_threads() == threads  # the workers' setting does not leak
    finally:
        torch.set_num_threads(before)
    scale = expected.abs().amax(dim=(1, 2), keepdim=True)
    assert got.dtype == torch.float32
    assert float(((got.double() - expected).abs() / scale).max()) <= 1e-4


def test_gram_overflow_is_a_numerical_error() -> None:
    g = torch.full((2, 4), 1e20)  # finite in float32, but the Gram (1e40) overflows
    est = create("estimator", "woodfisher", algorithm="gram", block_size=4)
    est.setup([4])
    est.update(g)
    with pytest.raises(NumericalError, match="overflowed in torch.float32; use dtype = 'float64'"):
        est.inverse_diagonal()


# -- planning --------------------------------------------------------------------------------------
def test_memory_bytes_counts_padded_blocks() -> None:
    sizes = [300, 50]  # blocks 128, 128, 44 | 50 -> 4 blocks padded to 128
    gram = WoodFisherConfig(algorithm="gram", block_size=128)
    woodbury = WoodFisherConfig(algorithm="woodbury", block_size=128, dtype="float64")
    assert WoodFisherEstimator.memory_bytes(sizes, gram) == 2 * 4 * 128**2 * 4
    assert WoodFisherEstimator.memory_bytes(sizes, woodbury) == 4 * 128**2 * 8
    big = WoodFisherConfig(block_size=1000)  # wider than every parameter: width = 300
    assert WoodFisherEstimator.memory_bytes(sizes, big) == 2 * 2 * 300**2 * 4
    assert WoodFisherEstimator.estimated_flops(sizes, gram) > 0


def test_auto_picks_woodbury_only_for_few_gradients() -> None:
    width = 128
    few = WoodFisherConfig(num_grads=width // AUTO_WOODBURY_RATIO)
    many = WoodFisherConfig(num_grads=width // AUTO_WOODBURY_RATIO + 1)
    assert choose_algorithm(few, width) == "woodbury"
    assert choose_algorithm(many, width) == "gram"
    est = WoodFisherEstimator(few)
    est.setup([1000])
    assert est.algorithm == "woodbury"


def test_block_layout_matches_core_layout() -> None:
    est = create("estimator", "woodfisher", block_size=3)
    est.setup([7, 2])
    expected = BlockLayout.build([7, 2], 3)
    assert torch.equal(est.block_layout.starts, expected.starts)
    assert torch.equal(est.block_layout.lengths, expected.lengths)


@pytest.mark.parametrize("kind", ["low-rank", "near-repeated"])
def test_woodbury_float32_breakdown_raises_instead_of_returning_nan(kind):
    """λ = 1e-7 on low-rank float32 gradients: the recursion's m + gᵀv rounds to ≤ 0 (NaN via
    rsqrt, or negative diagonal entries); before the guard the estimator returned them silently
    (1664 of 2048 NaN in the issue). float64 on the same gradients stays positive definite."""
    gen = torch.Generator().manual_seed(0)
    m, d = 64, 2048
    if kind == "low-rank":
        grads = torch.randn(m, 4, generator=gen) @ torch.randn(4, d, generator=gen)
    else:
        base = torch.randn(1, d, generator=gen).repeat(m, 1)
        grads = base + 1e-3 * torch.randn(m, d, generator=gen)
    options = {"algorithm": "woodbury", "block_size": 128, "damping": 1e-7, "num_grads": m}
    est = WoodFisherEstimator(WoodFisherConfig(**options))
    est.setup([d])
    with pytest.raises(NumericalError, match=r"lost positive definiteness in torch.float32 .* "
                                              r"inverse diagonal entries are NaN or <= 0"):
        est.update(grads)
    exact = WoodFisherEstimator(WoodFisherConfig(**options, dtype="float64"))
    exact.setup([d])
    exact.update(grads.double())
    diag = exact.inverse_diagonal()
    assert bool(torch.isfinite(diag).all() and (diag > 0).all())
