"""The isotropic estimator against a dense float64 ground truth, with Hypothesis properties."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from curvprune.testing.dense import assert_allclose, damped_fisher
from curvprune.testing.strategies import fisher_problems, gradients
from curvprune_example import IsotropicConfig, IsotropicEstimator


def _fit(problem):
    est = IsotropicEstimator(IsotropicConfig(damping=problem.damping, dtype="float64"))
    est.setup(problem.sizes)
    est.update(problem.grads)
    return est


@given(fisher_problems())
def test_scale_is_the_mean_trace_of_the_damped_fisher(problem):
    est = _fit(problem)
    fisher = damped_fisher(problem.grads, problem.sizes, None, problem.damping)
    # A sum of m·d ≤ 384 squares: relative round-off ≲ 384·eps ≈ 1e-13.
    assert_allclose(est.scale(), fisher.trace() / problem.d, rtol=1e-12, what="s")


@given(fisher_problems(), st.data())
def test_ihvp_divides_by_the_scale(problem, data):
    est = _fit(problem)
    v = data.draw(gradients(3, problem.d, bound=1.0))
    # One division per entry: exact up to one rounding.
    assert_allclose(est.ihvp(v), v / est.scale(), rtol=2 * torch.finfo(torch.float64).eps,
                    what="ihvp")


def test_before_any_gradient_the_inverse_is_identity_over_damping():
    est = IsotropicEstimator(IsotropicConfig(damping=0.5, dtype="float64"))
    est.setup([2, 3])
    assert torch.equal(est.inverse_diagonal(), torch.full((5,), 2.0, dtype=torch.float64))
