"""The builtin ``dense`` estimator: its contract suite, OBS exactness, and its own edge cases."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune import ParamLayout, PruneContext
from curvprune.testing.contracts import CurvatureEstimatorContract
from curvprune.testing.dense import (
    DenseConfig,
    DenseEstimator,
    assert_allclose,
    condition_number,
    damped_fisher,
    quadratic_loss_change,
)
from curvprune.testing.strategies import block_sizes, dampings, fisher_problems, gradients

EPS = torch.finfo(torch.float64).eps


class TestDenseOneBlock(CurvatureEstimatorContract):
    name = "dense"
    options = {"block_size": None}


class TestDenseBlocksOfThree(CurvatureEstimatorContract):
    name = "dense"
    options = {"block_size": 3}


# Well-conditioned problems: |g| <= 1 and λ ∈ [0.1, 10] give cond(F) <= 1 + 48/0.1 < 500, so
# float64 results carry relative errors ~d·eps·cond <= 48·2.2e-16·500 ≈ 5e-12.
_obs_problems = fisher_problems(block_sizes=block_sizes(), dampings=dampings(0.1, 10.0),
                                grad_bound=1.0)


def _fitted(problem):
    est = curvprune.create("estimator", "dense", damping=problem.damping,
                           block_size=problem.block_size, dtype="float64")
    est.setup(problem.sizes)
    est.update(problem.grads)
    return est


@given(problem=_obs_problems, data=st.data())
def test_obs_single_weight_removal_is_exact(problem, data):
    est = _fitted(problem)
    fisher = damped_fisher(problem.grads, problem.sizes, problem.block_size, problem.damping)
    w = data.draw(gradients(1, problem.d, bound=1.0), label="w")[0]
    q = data.draw(st.integers(0, problem.d - 1), label="q")
    w[q] = data.draw(st.sampled_from([1.0, -0.5, 3.0]), label="w_q")  # a weight worth removing
    e_q = torch.zeros(problem.d, dtype=torch.float64)
    e_q[q] = 1.0
    inv_qq = est.inverse_diagonal()[q]
    delta = -est.ihvp(e_q) * w[q] / inv_qq  # δw = −F⁻¹e_q·w_q/[F⁻¹]_qq (WoodFisher Eq. 4)
    rtol = 4 * problem.d * EPS * condition_number(fisher)
    assert abs(float(w[q] + delta[q])) <= rtol * abs(float(w[q])), "w_q + δw_q != 0"
    saliency = w[q] ** 2 / (2 * inv_qq)  # ρ_q = w_q²/(2[F⁻¹]_qq) (WoodFisher Eq. 5)
    assert_allclose(quadratic_loss_change(fisher, delta), saliency, rtol=rtol, what="½δwᵀFδw")

    # The builtin obs scorer, on top of this estimator, gives the same saliency and update.
    scorer = curvprune.create("scorer", "obs")
    ctx = PruneContext(model=nn.Identity(), layout=None, weights=w,
                       mask=torch.ones(problem.d, dtype=torch.bool), target_sparsity=0.5,
                       estimator=est)
    pruned = torch.zeros(problem.d, dtype=torch.bool)
    pruned[q] = True
    assert_allclose(scorer.score(ctx)[q], saliency, rtol=rtol, what="obs saliency")
    assert_allclose(scorer.compensate(ctx, pruned), delta, rtol=rtol, atol=rtol * abs(float(w[q])),
                    what="obs compensation")


@given(problem=_obs_problems, data=st.data())
def test_joint_removal_within_a_block_is_exact(problem, data):
    """δw = −F⁻¹E_P([F⁻¹]_PP)⁻¹w_P zeroes w_P; loss ½w_Pᵀ([F⁻¹]_PP)⁻¹w_P (OBS, several weights)."""
    est = _fitted(problem)
    fisher = damped_fisher(problem.grads, problem.sizes, problem.block_size, problem.damping)
    blocks = est.block_layout
    b = data.draw(st.integers(0, blocks.n_blocks - 1), label="block")
    start, length = int(blocks.starts[b]), int(blocks.lengths[b])
    members = data.draw(st.lists(st.integers(start, start + length - 1), min_size=1, unique=True,
                                 max_size=4), label="P")
    w = data.draw(gradients(1, problem.d, bound=1.0), label="w")[0]
    w[members] = 1.0
    idx = torch.tensor([members + [-1]])
    block_inv = est.inverse_columns(idx)[0, : len(members), : len(members)]
    u = torch.zeros(problem.d, dtype=torch.float64)
    u[members] = torch.linalg.solve(block_inv, w[members])
    delta = -est.ihvp(u)
    rtol = 8 * problem.d * EPS * condition_number(fisher)
    assert_allclose(w[members] + delta[members], torch.zeros(len(members), dtype=torch.float64),
                    rtol=0, atol=rtol, what="w_P + δw_P")
    expected = 0.5 * w[members] @ u[members]
    assert_allclose(quadratic_loss_change(fisher, delta), expected, rtol=rtol, what="½δwᵀFδw")


def test_create_builds_the_dense_estimator_with_its_config():
    est = curvprune.create("estimator", "dense", damping=1e-3)
    assert isinstance(est, DenseEstimator)
    assert isinstance(est.config, DenseConfig)
    assert est.config.damping == 1e-3 and est.config.block_size is None


def test_without_gradients_the_inverse_is_identity_over_damping():
    est = DenseEstimator(DenseConfig(damping=0.25, block_size=2, dtype="float64"))
    est.setup([3, 2])
    assert est.num_samples == 0
    assert torch.equal(est.inverse_diagonal(), torch.full((5,), 4.0, dtype=torch.float64))


def test_memory_bytes_counts_padded_gram_and_the_inversion():
    # sizes (5, 3) with B = 2: blocks 2,2,1 | 2,1 -> 5 blocks padded to width 2; float32. The
    # peak is three batches (Gram, factor, inverse of the factor); the Gram alone is held while
    # gradients stream in.
    assert DenseEstimator.memory_bytes([5, 3], DenseConfig(block_size=2)) == 3 * 5 * 2 * 2 * 4
    assert DenseEstimator.memory_bytes([5, 3], DenseConfig(dtype="float64")) == 3 * 8 * 8 * 8
    layout = ParamLayout(("a", "b"), (torch.Size([5]), torch.Size([3])), ("Linear", "Linear"))
    assert DenseEstimator.plan_held_bytes(layout, DenseConfig(block_size=2)) == 5 * 2 * 2 * 4


def test_update_invalidates_the_cached_inverse():
    est = DenseEstimator(DenseConfig(damping=1.0, dtype="float64"))
    est.setup([2])
    est.update(torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(est.inverse_diagonal(), torch.tensor([0.5, 1.0], dtype=torch.float64))
    est.update(torch.tensor([[0.0, 2.0]]))  # F = I + diag(1, 4)/2
    assert torch.allclose(est.inverse_diagonal(), torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_inverse_columns_rejects_a_row_spanning_two_blocks():
    est = DenseEstimator(DenseConfig(block_size=2, dtype="float64"))
    est.setup([4])
    with pytest.raises(ValueError, match="one block"):
        est.inverse_columns(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        est.inverse_columns(torch.tensor([[4, -1]]))


@given(problem=fisher_problems(), block_size=block_sizes())
def test_block_inverses_are_symmetric_positive_definite(problem, block_size):
    est = curvprune.create("estimator", "dense", damping=problem.damping, block_size=block_size,
                           dtype="float64")
    est.setup(problem.sizes)
    est.update(problem.grads)
    inv = est.block_inverses()
    assert torch.equal(inv, inv.mT), "block inverses must be exactly symmetric"
    assert bool((torch.linalg.eigvalsh(inv) > 0).all())


def test_non_finite_gradients_raise_a_numerical_error():
    est = DenseEstimator(DenseConfig(dtype="float64"))
    est.setup([2])
    est.update(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(curvprune.NumericalError, match="not positive definite"):
        est.inverse_diagonal()


def test_queries_before_setup_raise_a_clear_error():
    import curvprune

    est = curvprune.create("estimator", "dense")
    for call in (lambda: est.update(torch.zeros(1, 3)), lambda: est.ihvp(torch.zeros(3)),
                 est.inverse_diagonal, lambda: est.inverse_columns(torch.zeros(1, 1, dtype=torch.long))):
        with pytest.raises(curvprune.EstimatorStateError, match=r"before setup\(sizes\)"):
            call()
