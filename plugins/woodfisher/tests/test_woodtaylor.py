"""The woodtaylor scorer on an exact quadratic model L(w + δ) − L(w) = ḡᵀδ + ½δᵀFδ.

F is the dense float64 block-diagonal damped Fisher of the same gradients the (float64)
estimator sees, so F⁻¹ is exact up to round-off and every identity of the derivation must hold.

Tolerance: all quantities are products of F⁻¹ with vectors of size ~ ‖w‖ + ‖F⁻¹‖‖ḡ‖, computed
with error ≲ c·(d + m)·eps·‖F‖/λ relative to ‖F⁻¹‖ (see test_estimator.py); predicted and
evaluated loss changes involve F·δ, which multiplies that by ‖F‖. Damping ≥ 0.05 and gradients
≤ 1 keep ‖F‖/λ ≤ 1 + 16/0.05, so the bound below stays ≤ 1e-9 relative while a wrong multiplier,
a missing −u or a cross-block term gives O(1) errors.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from curvprune import ConfigError, ParamLayout, PruneContext, create, get_plugin_manager
from curvprune_woodfisher import WoodTaylorConfig, WoodTaylorScorer, plugin

HOST = get_plugin_manager(autoload=False, plugins=[("woodfisher", plugin)])
EPS = torch.finfo(torch.float64).eps


class Quadratic:
    """A drawn quadratic model with its fitted estimator and a prune context."""

    def __init__(self, ref, sizes: tuple[int, ...], block_size: int, damping: float, seed: int,
                 zero_gradient: bool = False) -> None:
        gen = torch.Generator().manual_seed(seed)
        d, m = sum(sizes), 6
        grads = torch.rand(m, d, generator=gen, dtype=torch.float64) * 2 - 1
        self.fisher = ref.dense_fisher(grads, sizes, block_size, damping)
        self.inverse = torch.linalg.inv(self.fisher)
        self.gbar = torch.zeros(d, dtype=torch.float64) if zero_gradient else grads.mean(0)
        self.w = torch.randn(d, generator=gen, dtype=torch.float64)
        self.estimator = create("estimator", "woodfisher", host=HOST, algorithm="gram",
                                dtype="float64", block_size=block_size, damping=damping,
                                num_grads=m)
        self.estimator.setup(sizes)
        self.estimator.update(grads)
        self.block_ids = ref.block_ids(sizes, block_size)
        layout = ParamLayout(names=tuple(f"p{i}" for i in range(len(sizes))),
                             shapes=tuple(torch.Size([s]) for s in sizes),
                             module_types=("Linear",) * len(sizes))
        self.ctx = PruneContext(model=nn.Module(), layout=layout, weights=self.w.clone(),
                                mask=torch.ones(d, dtype=torch.bool), target_sparsity=0.5,
                                estimator=self.estimator, mean_grad=self.gbar)
        norm_f = float(torch.linalg.matrix_norm(self.fisher, ord=2))
        self.tol = 16 * (d + m) * EPS * norm_f / damping

    @property
    def u(self) -> Tensor:
        return self.inverse @ self.gbar

    def loss_change(self, delta: Tensor) -> Tensor:
        return self.gbar @ delta + 0.5 * delta @ self.fisher @ delta

    def weight_scale(self, delta: Tensor) -> float:
        return float(self.w.abs().max() + delta.abs().max())

    def loss_scale(self, delta: Tensor) -> float:
        return float(torch.linalg.matrix_norm(self.fisher, ord=2)) * self.weight_scale(delta) ** 2


@st.composite
def quadratics(draw: st.DrawFn) -> dict:
    return {
        "sizes": tuple(draw(st.lists(st.integers(1, 10), min_size=1, max_size=3))),
        "block_size": draw(st.integers(1, 12)),
        "damping": 10 ** draw(st.floats(-1.3, 0)),
        "seed": draw(st.integers(0, 2**16)),
    }


def scorer(**options) -> WoodTaylorScorer:
    return create("scorer", "woodtaylor", host=HOST, **options)


@settings(max_examples=40)
@given(problem=quadratics(), data=st.data())
def test_single_weight_update_is_exact(ref, problem: dict, data) -> None:
    model = Quadratic(ref, **problem)
    q = data.draw(st.integers(0, model.w.numel() - 1), label="q")
    pruned = torch.zeros_like(model.w, dtype=torch.bool)
    pruned[q] = True
    for joint in (False, True):
        woodtaylor = scorer(joint=joint)
        scores = woodtaylor.score(model.ctx)
        delta = woodtaylor.compensate(model.ctx, pruned)
        predicted = woodtaylor.predicted_loss_change(model.ctx, pruned)
        assert abs(float(model.w[q] + delta[q])) <= model.tol * model.weight_scale(delta)
        # ΔL = ρ_q = ½(w_q − u_q)²/[F⁻¹]_qq − ½ḡᵀu, and score() is ρ without the constant.
        u = model.u
        expected = 0.5 * (model.w[q] - u[q]) ** 2 / model.inverse[q, q] - 0.5 * model.gbar @ u
        scale = model.loss_scale(delta)
        assert abs(float(model.loss_change(delta) - predicted)) <= model.tol * scale
        assert abs(float(predicted - expected)) <= model.tol * scale
        assert abs(float(scores[q] - 0.5 * model.gbar @ u - expected)) <= model.tol * scale
        # The update is the constrained minimiser: δ = −u − F⁻¹e_q(w_q − u_q)/[F⁻¹]_qq.
        minimiser = -u - model.inverse[:, q] * (model.w[q] - u[q]) / model.inverse[q, q]
        assert float((delta - minimiser).abs().max()) <= model.tol * model.weight_scale(delta)


@settings(max_examples=40)
@given(problem=quadratics(), data=st.data())
def test_joint_update_solves_the_constrained_problem(ref, problem: dict, data) -> None:
    model = Quadratic(ref, **problem)
    d = model.w.numel()
    chosen = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True),
                       label="pruned")
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[chosen] = True
    woodtaylor = scorer(joint=True)
    woodtaylor.score(model.ctx)
    delta = woodtaylor.compensate(model.ctx, pruned)
    predicted = woodtaylor.predicted_loss_change(model.ctx, pruned)
    # KKT of min ḡᵀδ + ½δᵀFδ s.t. E_Pᵀ(w + δ) = 0, solved densely:
    # [F  E][δ]   [−ḡ  ]
    # [Eᵀ 0][μ] = [−w_P]
    index = pruned.nonzero().squeeze(1)
    e = torch.eye(d, dtype=torch.float64)[:, index]
    p = index.numel()
    kkt = torch.cat([torch.cat([model.fisher, e], 1),
                     torch.cat([e.T, torch.zeros(p, p, dtype=torch.float64)], 1)])
    solution = torch.linalg.solve(kkt, torch.cat([-model.gbar, -model.w[index]]))
    scale = model.weight_scale(delta)
    assert float((model.w[index] + delta[index]).abs().max()) <= model.tol * scale
    assert float((delta - solution[:d]).abs().max()) <= model.tol * scale
    loss = model.loss_change(delta)
    assert abs(float(loss - predicted)) <= model.tol * model.loss_scale(delta)
    assert abs(float(loss - model.loss_change(solution[:d]))) <= model.tol * model.loss_scale(delta)


@settings(max_examples=30)
@given(problem=quadratics(), data=st.data())
def test_summed_update_and_prediction(ref, problem: dict, data) -> None:
    model = Quadratic(ref, **problem)
    d = model.w.numel()
    chosen = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True),
                       label="pruned")
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[chosen] = True
    woodtaylor = scorer()
    woodtaylor.score(model.ctx)
    delta = woodtaylor.compensate(model.ctx, pruned)
    u, diag = model.u, model.inverse.diagonal()
    z = torch.where(pruned, (model.w - u) / diag, 0)
    expected = -u - model.inverse @ z
    assert float((delta - expected).abs().max()) <= model.tol * model.weight_scale(delta)
    predicted = woodtaylor.predicted_loss_change(model.ctx, pruned)
    summed = (0.5 * (model.w - u) ** 2 / diag)[pruned].sum() - 0.5 * model.gbar @ u
    assert abs(float(predicted - summed)) <= model.tol * model.loss_scale(delta)


@settings(max_examples=20)
@given(problem=quadratics(), data=st.data())
def test_zero_gradient_reduces_to_obs(ref, problem: dict, data) -> None:
    model = Quadratic(ref, **problem, zero_gradient=True)
    d = model.w.numel()
    chosen = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True),
                       label="pruned")
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[chosen] = True
    for joint in (False, True):
        obs = create("scorer", "obs", host=HOST, joint=joint)
        woodtaylor = scorer(joint=joint)
        torch.testing.assert_close(woodtaylor.score(model.ctx), obs.score(model.ctx))
        torch.testing.assert_close(woodtaylor.compensate(model.ctx, pruned),
                                   obs.compensate(model.ctx, pruned))
        torch.testing.assert_close(woodtaylor.predicted_loss_change(model.ctx, pruned),
                                   obs.predicted_loss_change(model.ctx, pruned))


def test_prediction_without_compensate_and_without_update(ref) -> None:
    model = Quadratic(ref, (6, 4), 4, 0.1, seed=5)
    pruned = torch.zeros(10, dtype=torch.bool)
    pruned[[1, 2, 7]] = True
    for joint in (False, True):
        reference = scorer(joint=joint)
        reference.compensate(model.ctx, pruned)
        expected = reference.predicted_loss_change(model.ctx, pruned)
        fresh = scorer(joint=joint)
        torch.testing.assert_close(fresh.predicted_loss_change(model.ctx, pruned), expected)
        frozen = scorer(joint=joint, update=False)
        assert frozen.compensate(model.ctx, pruned) is None
        torch.testing.assert_close(frozen.predicted_loss_change(model.ctx, pruned), expected)


def test_joint_group_limit_and_missing_inputs(ref) -> None:
    model = Quadratic(ref, (8,), 8, 0.1, seed=6)
    with pytest.raises(ConfigError, match=r"max_joint_group = 2\).*@ scorer\.joint"):
        scorer(joint=True, max_joint_group=2).compensate(model.ctx, torch.ones(8, dtype=torch.bool))
    model.ctx.mean_grad = None
    with pytest.raises(ConfigError, match="mean gradient"):
        scorer().score(model.ctx)
    model.ctx.estimator = None
    with pytest.raises(ConfigError, match="curvature estimator"):
        scorer().score(model.ctx)


def test_declares_what_it_needs_and_validates_config() -> None:
    assert WoodTaylorScorer.needs_curvature and WoodTaylorScorer.needs_gradient
    assert WoodTaylorScorer().config == WoodTaylorConfig()
    with pytest.raises(ConfigError, match=r"max_joint_group must be >= 1, got 0 @ scorer"):
        scorer(max_joint_group=0)
