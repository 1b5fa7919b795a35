"""Gate-space gradient, GGN-vector products, quadratic forms and the S×S matrix vs dense truths.

Everything runs in float64 on networks with ≤ 7 gates, so the only error is round-off in sums of
a few dozen terms of size O(1) to O(10): a relative tolerance of 1e-10 is ~10⁵ eps, far above
round-off and far below any modelling mistake (which would be O(1)).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvprune_sosp.curvature import (
    choose_jacobian_mode,
    gradient_and_ggn_vector,
    gradient_and_hessian_vector,
    quadratic_form,
    structure_ggn,
)
from curvprune_sosp.losses import resolve_output_curvature

TOL = {"rtol": 1e-10, "atol": 1e-12}
LOSS_KINDS = ["cross_entropy", "mse", "autograd"]


def factory(kind, loss_fn):
    return lambda out, y: resolve_output_curvature(kind, loss_fn, out, y)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(LOSS_KINDS), ones=st.booleans())
def test_ggn_vector_product_and_gradient_equal_dense(dense, seed, kind, ones) -> None:
    """SOSP-H's per-batch JVP → Λ → VJP accumulates exactly G·t and g (dense, brute force)."""
    p = dense.problem(seed, kind)
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.ones(p.S, dtype=torch.float64) if ones else torch.randn(p.S, generator=gen,
                                                                      dtype=torch.float64)
    stats, _ = gradient_and_ggn_vector(p.space, p.model, p.batches, factory(kind, p.loss_fn),
                                       t, num_samples=10_000)
    assert stats.num_samples == p.x.shape[0]
    torch.testing.assert_close(stats.mean_ggn_vector(), dense.ggn(p) @ t, **TOL)
    torch.testing.assert_close(stats.mean_grad(), dense.grad(p), **TOL)


def test_num_samples_cuts_the_data(dense) -> None:
    """Only the first num_samples samples count (the last batch is cut)."""
    p = dense.problem(3, "cross_entropy")
    t = torch.ones(p.S, dtype=torch.float64)
    stats, _ = gradient_and_ggn_vector(p.space, p.model, p.batches,
                                       factory("cross_entropy", p.loss_fn), t, num_samples=6)
    q = dense.problem(3, "cross_entropy", n=11)
    q.x, q.y = q.x[:6], q.y[:6]
    assert stats.num_samples == 6
    torch.testing.assert_close(stats.mean_ggn_vector(), dense.ggn(q) @ t, **TOL)
    assert stats.count.tolist() == [4.0, 2.0]  # batch 0 → half 0, batch 1 (cut to 2) → half 1


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(LOSS_KINDS),
       mode=st.sampled_from(["reverse", "forward"]), chunk=st.sampled_from([1, 2, 1 << 20]))
def test_structure_ggn_equals_dense(dense, seed, kind, mode, chunk) -> None:
    """SOSP-I's S×S matrix and gradient equal the dense GGN and g, in both Jacobian modes."""
    p = dense.problem(seed, kind)
    ggn, _ = structure_ggn(p.space, p.model, p.batches, factory(kind, p.loss_fn), 10_000,
                           device=torch.device("cpu"), mode=mode, dtype=torch.float64,
                           max_jacobian_elements=chunk * 3 * p.S)
    assert ggn.mode == mode
    torch.testing.assert_close(ggn.matrix, dense.ggn(p), **TOL)
    torch.testing.assert_close(ggn.grad, dense.grad(p), **TOL)
    assert torch.equal(ggn.matrix, ggn.matrix.T) or torch.allclose(ggn.matrix, ggn.matrix.T)


def test_jacobian_mode_takes_fewer_passes() -> None:
    assert choose_jacobian_mode("auto", 10, 500) == "reverse"
    assert choose_jacobian_mode("auto", 1000, 64) == "forward"
    assert choose_jacobian_mode("forward", 10, 500) == "forward"


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(LOSS_KINDS))
def test_quadratic_form_equals_dense(dense, seed, kind) -> None:
    """tᵀGt from forward passes only equals the dense quadratic form."""
    p = dense.problem(seed, kind)
    t = (torch.arange(p.S) % 2).double()
    curv = resolve_output_curvature(kind, p.loss_fn, p.model(p.x[:2]), p.y[:2])
    value = quadratic_form(p.space, p.model, p.batches, curv, t, 10_000)
    torch.testing.assert_close(value, t @ dense.ggn(p) @ t, **TOL)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(LOSS_KINDS))
def test_sosp_h_saliencies_sum_to_the_modelled_change_of_removing_all(dense, seed, kind) -> None:
    """Σₛ λₛ = −gᵀ𝟙 + ½·𝟙ᵀG𝟙 = ΔL_model(all structures) (memo §4.4)."""
    p = dense.problem(seed, kind)
    t = torch.ones(p.S, dtype=torch.float64)
    stats, _ = gradient_and_ggn_vector(p.space, p.model, p.batches, factory(kind, p.loss_fn),
                                       t, 10_000)
    saliency = -stats.mean_grad() + 0.5 * stats.mean_ggn_vector()
    g, G = dense.grad(p), dense.ggn(p)
    torch.testing.assert_close(saliency.sum(), -g.sum() + 0.5 * t @ G @ t, **TOL)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(["cross_entropy", "mse"]))
def test_ggn_is_the_exact_hessian_minus_the_residual_term(dense, seed, kind) -> None:
    """∂²L/∂m² = G + (1/N)·Σₙ Σ_c rₙ,c ∇²fₙ,c: the GGN drops exactly the residual curvature."""
    p = dense.problem(seed, kind)
    ones = torch.ones(p.S, dtype=torch.float64)
    out = p.model(p.x).detach()
    residual = torch.autograd.functional.jacobian(lambda f: p.loss_fn(f, p.y), out) * out.shape[0]
    term = torch.autograd.functional.hessian(
        lambda m: (residual * p.model(p.x, m)).sum() / out.shape[0], ones
    )
    torch.testing.assert_close(dense.hessian(p), dense.ggn(p) + term, **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_model_is_exact_where_the_loss_is_quadratic_in_the_gates(dense, seed) -> None:
    """Gates on the last hidden layer + MSE: the logits are linear in m, L is quadratic in m,
    the GGN is the Hessian, and the model ΔL(M) = −gᵀe_M + ½e_MᵀGe_M must equal the actual loss
    change of zeroing the gates of M, for every single and pair removal."""
    p = dense.problem(seed, "mse", last_only=True)
    ggn, curv = structure_ggn(p.space, p.model, p.batches, factory("mse", p.loss_fn), 10_000,
                              device=torch.device("cpu"), mode="reverse", dtype=torch.float64)
    torch.testing.assert_close(ggn.matrix, dense.hessian(p), **TOL)
    ones = torch.ones(p.S, dtype=torch.float64)
    base = dense.loss_at(p, ones)
    for size in (1, 2):
        for removed in itertools.combinations(range(p.S), size):
            e = torch.zeros(p.S, dtype=torch.float64)
            e[list(removed)] = 1.0
            actual = dense.loss_at(p, ones - e) - base
            from_matrix = -ggn.grad @ e + 0.5 * e @ ggn.matrix @ e
            from_forward = -ggn.grad @ e + 0.5 * quadratic_form(p.space, p.model, p.batches,
                                                               curv, e, 10_000)
            torch.testing.assert_close(from_matrix, actual, **TOL)
            torch.testing.assert_close(from_forward, actual, **TOL)


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_model_matches_the_second_order_expansion(dense, seed) -> None:
    """In general the model is the second-order Taylor expansion with H replaced by G:
    −gᵀe + ½eᵀHe (H exact) minus the model equals ½eᵀ(residual term)e, for singles and pairs."""
    p = dense.problem(seed, "cross_entropy")
    ggn, _ = structure_ggn(p.space, p.model, p.batches, factory("cross_entropy", p.loss_fn),
                           10_000, device=torch.device("cpu"), dtype=torch.float64)
    hess, g, ggn_dense = dense.hessian(p), dense.grad(p), dense.ggn(p)
    for removed in itertools.chain(itertools.combinations(range(p.S), 1),
                                   itertools.combinations(range(p.S), 2)):
        e = torch.zeros(p.S, dtype=torch.float64)
        e[list(removed)] = 1.0
        taylor = -g @ e + 0.5 * e @ hess @ e
        model = -ggn.grad @ e + 0.5 * e @ ggn.matrix @ e
        torch.testing.assert_close(taylor - model, 0.5 * e @ (hess - ggn_dense) @ e, **TOL)


def test_forward_mode_products_print_no_torch_deprecation_warning():
    """torch's first dual tensor scripts its decompositions (a FutureWarning); SOSP hides it."""
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error', FutureWarning)\n"
        "from curvprune_sosp.curvature import _make_dual\n"
        "import torch.autograd.forward_ad as fwAD\n"
        "with fwAD.dual_level():\n"
        "    _make_dual(torch.ones(2), torch.ones(2))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-400:]


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(LOSS_KINDS), ones=st.booleans())
def test_exact_hessian_vector_product_and_gradient_equal_dense(dense, seed, kind, ones) -> None:
    """SOSP-H's exact product: H·t with H = ∂²L/∂m² (brute-force dense Hessian), and g."""
    p = dense.problem(seed, kind)
    gen = torch.Generator().manual_seed(seed + 2)
    t = torch.ones(p.S, dtype=torch.float64) if ones else torch.randn(p.S, generator=gen,
                                                                      dtype=torch.float64)
    stats, _ = gradient_and_hessian_vector(p.space, p.model, p.batches,
                                           factory(kind, p.loss_fn), t, num_samples=10_000)
    assert stats.num_samples == p.x.shape[0]
    torch.testing.assert_close(stats.mean_ggn_vector(), dense.hessian(p) @ t, **TOL)
    torch.testing.assert_close(stats.mean_grad(), dense.grad(p), **TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_and_ggn_products_differ_by_the_residual_term(dense, seed) -> None:
    """The exact product is not the GGN one where the logits are nonlinear in the gates."""
    p = dense.problem(seed, "cross_entropy")
    t = torch.ones(p.S, dtype=torch.float64)
    exact, _ = gradient_and_hessian_vector(p.space, p.model, p.batches,
                                           factory("cross_entropy", p.loss_fn), t, 10_000)
    ggn, _ = gradient_and_ggn_vector(p.space, p.model, p.batches,
                                     factory("cross_entropy", p.loss_fn), t, 10_000)
    assert not torch.allclose(exact.mean_ggn_vector(), ggn.mean_ggn_vector())
