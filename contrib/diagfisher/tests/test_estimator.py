"""The diagonal Fisher against the dense float64 diagonal of F = λI + (1/m)Σggᵀ."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvprune import ConfigError, ParamLayout, create, get_plugin_manager
from curvprune.testing.dense import assert_allclose, damped_fisher
from curvprune.testing.strategies import fisher_problems, gradients
from curvprune_diagfisher import DiagFisherConfig, DiagFisherEstimator, plugin


def _fit(problem, dtype="float64"):
    est = DiagFisherEstimator(DiagFisherConfig(damping=problem.damping, dtype=dtype))
    est.setup(problem.sizes)
    est.update(problem.grads)
    return est


@given(fisher_problems())
def test_fisher_diagonal_is_the_dense_diagonal(problem):
    est = _fit(problem)
    expected = damped_fisher(problem.grads, problem.sizes, None, problem.damping).diagonal()
    # Both sum the same m ≤ 8 squares: round-off ~m·eps relative, with a 10× margin.
    assert_allclose(est.fisher_diagonal(), expected, rtol=1e-14, what="diag(F)")


@given(fisher_problems(), st.data())
def test_queries_are_elementwise_inverses(problem, data):
    est = _fit(problem)
    fisher = damped_fisher(problem.grads, problem.sizes, 1, problem.damping)  # blocks of one
    inverse = torch.linalg.inv(fisher)
    v = data.draw(gradients(2, problem.d, bound=1.0))
    # A diagonal solve is one division per entry: relative error ≤ ~2 eps.
    assert_allclose(est.ihvp(v), v @ inverse, rtol=1e-14, atol=1e-300, what="ihvp")
    assert_allclose(est.inverse_diagonal(), inverse.diagonal(), rtol=1e-14, what="inverse_diag")
    idx = torch.tensor([[0, -1], [problem.d - 1, -1]])
    cols = est.inverse_columns(idx)
    assert torch.equal(cols[:, 1, 1], torch.ones(2, dtype=torch.float64))
    assert cols[0, 0, 0] == est.inverse_diagonal()[0] and cols[0, 0, 1] == 0


def test_block_layout_is_single_weights():
    est = DiagFisherEstimator()
    est.setup([3, 2])
    assert est.block_layout.lengths.tolist() == [1] * 5


def test_block_size_must_be_none_or_one():
    assert DiagFisherConfig(block_size=1).block_size == 1
    with pytest.raises(ValueError, match="block_size must be None or 1 .*got 4"):
        DiagFisherConfig(block_size=4)
    with pytest.raises(ConfigError, match=r"block_size must be None or 1.*@ estimator"):
        # In-process registration: runs whether or not the distribution is installed.
        host = get_plugin_manager(autoload=False, plugins=[("diagfisher", plugin)])
        create("estimator", "diagfisher", host=host, block_size=4)


def test_memory_is_one_number_per_weight_held_three_at_a_query():
    assert DiagFisherEstimator.memory_bytes([10, 6], DiagFisherConfig()) == 3 * 16 * 4
    double = DiagFisherConfig(dtype="float64")
    assert DiagFisherEstimator.memory_bytes([10, 6], double) == 3 * 16 * 8
    layout = ParamLayout(("a", "b"), (torch.Size([10]), torch.Size([6])), ("Linear", "Linear"))
    assert DiagFisherEstimator.plan_held_bytes(layout, DiagFisherConfig()) == 16 * 4


def test_obs_saliency_is_obd_up_to_damping():
    """ρ_q = w_q²/(2[F⁻¹]_qq) = w_q²·F_qq/2 with F_qq = λ + mean g_q² (LeCun et al. 1990)."""
    est = DiagFisherEstimator(DiagFisherConfig(damping=0.5, dtype="float64"))
    est.setup([3])
    grads = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    est.update(grads)
    w = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    saliency = w.square() / (2 * est.inverse_diagonal())
    expected = w.square() * (0.5 + grads.square().mean(0)) / 2
    assert torch.allclose(saliency, expected, rtol=1e-15, atol=0)
