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
from hypothesis import assume, given, settings
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
        self.param = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        self.n_params = len(sizes)

    def param_norms(self, v: Tensor) -> Tensor:
        """‖v_l‖ for every parameter l."""
        out = torch.zeros(self.n_params, dtype=torch.float64)
        return out.index_add_(0, self.param, v.square()).sqrt()

    def clipped_gradient(self, alpha: float, mult: float) -> Tensor:
        """ḡ_t = α·Tḡ with t_l = min(1, r‖w_l‖/(α‖u_l‖)), from the dense inverse."""
        move = alpha * self.param_norms(self.u)
        radius = mult * self.param_norms(self.w)
        scale = torch.where(move > radius, radius / move, torch.ones_like(move))
        return alpha * scale[self.param] * self.gbar

    @property
    def u(self) -> Tensor:
        return self.inverse @ self.gbar

    def loss_change(self, delta: Tensor) -> Tensor:
        return self.gbar @ delta + 0.5 * delta @ self.fisher @ delta

    def weight_scale(self, delta: Tensor) -> float:
        """‖w‖ + ‖δ‖ + ‖u‖ (max norms): the size of the vectors the scorer forms (see the top).

        u = F⁻¹ḡ belongs here even when δ is small: ½ḡᵀu = ½uᵀFu enters every predicted change
        (a 1-weight problem with |w| = 0.003 has δ = −w but ḡᵀu ≈ 1e-3).
        """
        return float(self.w.abs().max() + delta.abs().max() + self.u.abs().max())

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
    """The exact (unclipped) scorer unless ``options`` say otherwise."""
    return WoodTaylorScorer(WoodTaylorConfig(**{"normalize_update": False, **options}))


def draw_pruned(data, d: int) -> Tensor:
    """A non-empty set of pruned coordinates drawn by Hypothesis, as a bool mask ``[d]``."""
    chosen = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d, unique=True),
                       label="pruned")
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[chosen] = True
    return pruned


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
    pruned = draw_pruned(data, d)
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
    pruned = draw_pruned(data, d)
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
    pruned = draw_pruned(data, d)
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
        create("scorer", "woodtaylor", host=HOST, max_joint_group=0)
    with pytest.raises(ConfigError, match=r"first_order must be >= 0, got -1.0 @ scorer"):
        create("scorer", "woodtaylor", host=HOST, first_order=-1)
    with pytest.raises(ConfigError, match=r"normalize_update_mult must be > 0, got 0.0 @ scorer"):
        create("scorer", "woodtaylor", host=HOST, normalize_update_mult=0)
    exact = create("scorer", "woodtaylor", host=HOST, normalize_update=False)
    assert exact.config.normalize_update is False


def kkt_solution(model: Quadratic, gbar: Tensor, pruned: Tensor) -> Tensor:
    """argmin gbarᵀδ + ½δᵀFδ s.t. E_Pᵀ(w + δ) = 0, by a dense KKT solve."""
    d = model.w.numel()
    index = pruned.nonzero().squeeze(1)
    e = torch.eye(d, dtype=torch.float64)[:, index]
    p = index.numel()
    kkt = torch.cat([torch.cat([model.fisher, e], 1),
                     torch.cat([e.T, torch.zeros(p, p, dtype=torch.float64)], 1)])
    return torch.linalg.solve(kkt, torch.cat([-gbar, -model.w[index]]))[:d]


@settings(max_examples=30)
@given(problem=quadratics(), data=st.data(),
       alpha=st.sampled_from([0.5, 1.0, 2.0]), mult=st.floats(1e-3, 0.5))
def test_clipped_move_is_exact_woodtaylor_inside_the_bound(
    ref, problem: dict, data, alpha: float, mult: float
) -> None:
    model = Quadratic(ref, **problem)
    d = model.w.numel()
    pruned = draw_pruned(data, d)
    gbar_t = model.clipped_gradient(alpha, mult)
    u_t = model.inverse @ gbar_t
    # The ground truth itself respects the bound: F is block diagonal within parameters, so
    # u_t,l = α t_l u_l (a wrong per-parameter norm or scale breaks this, not just the plugin).
    radius = mult * model.param_norms(model.w)
    assert bool((model.param_norms(u_t) <= radius * (1 + 1e-9) + model.tol).all())
    joint = scorer(joint=True, first_order=alpha, normalize_update=True, normalize="first_order",
                   normalize_update_mult=mult)
    scores = joint.score(model.ctx)
    delta = joint.compensate(model.ctx, pruned)
    predicted = joint.predicted_loss_change(model.ctx, pruned)
    scale = model.weight_scale(delta)
    # Scores are those of the clipped model: ½(w_q − u_t,q)²/[F⁻¹]_qq.
    expected_scores = 0.5 * (model.w - u_t) ** 2 / model.inverse.diagonal()
    assert float((scores - expected_scores).abs().max()) <= model.tol * model.loss_scale(delta)
    # Pruned weights end exactly at zero, and δ is the KKT solution of the clipped model.
    assert float((model.w[pruned] + delta[pruned]).abs().max()) <= model.tol * scale
    assert float((delta - kkt_solution(model, gbar_t, pruned)).abs().max()) <= model.tol * scale
    # The prediction is that model's change at δ.
    change = gbar_t @ delta + 0.5 * delta @ model.fisher @ delta
    assert abs(float(change - predicted)) <= model.tol * model.loss_scale(delta)
    # Summed update: −u_t − F⁻¹z with z_q = (w_q − u_t,q)/[F⁻¹]_qq on P.
    summed = scorer(first_order=alpha, normalize_update=True, normalize="first_order",
                    normalize_update_mult=mult)
    summed.score(model.ctx)
    z = torch.where(pruned, (model.w - u_t) / model.inverse.diagonal(), 0)
    expected = -u_t - model.inverse @ z
    delta = summed.compensate(model.ctx, pruned)
    assert float((delta - expected).abs().max()) <= model.tol * model.weight_scale(delta)


@settings(max_examples=20)
@given(problem=quadratics(), data=st.data())
def test_inactive_bound_is_the_exact_method(ref, problem: dict, data) -> None:
    model = Quadratic(ref, **problem)
    d = model.w.numel()
    pruned = draw_pruned(data, d)
    # ‖u‖ ≤ ‖ḡ‖/λ ≤ √d/0.05 and ‖w_l‖ is O(1): a radius of 1e9·‖w_l‖ is never reached (with
    # probability 1 no parameter has w_l = 0).
    for joint in (False, True):
        exact = scorer(joint=joint)
        loose = scorer(joint=joint, normalize_update=True, normalize="first_order",
                       normalize_update_mult=1e9)
        torch.testing.assert_close(loose.score(model.ctx), exact.score(model.ctx), rtol=0, atol=0)
        torch.testing.assert_close(loose.compensate(model.ctx, pruned),
                                   exact.compensate(model.ctx, pruned), rtol=0, atol=0)
        torch.testing.assert_close(loose.predicted_loss_change(model.ctx, pruned),
                                   exact.predicted_loss_change(model.ctx, pruned), rtol=0, atol=0)


def test_active_bound_changes_the_update(ref) -> None:
    # Counterpart of the test above: with a tight radius the clipped update must differ.
    model = Quadratic(ref, (6, 4), 4, 0.1, seed=7)
    pruned = torch.zeros(10, dtype=torch.bool)
    pruned[[0, 5, 8]] = True
    exact = scorer().compensate(model.ctx, pruned)
    clipped = scorer(normalize_update=True, normalize="first_order",
                     normalize_update_mult=1e-3).compensate(
        model.ctx, pruned)
    assert float((exact - clipped).abs().max()) > 1e-3


def test_zero_first_order_weight_is_obs(ref) -> None:
    model = Quadratic(ref, (6, 4), 4, 0.1, seed=8)
    pruned = torch.zeros(10, dtype=torch.bool)
    pruned[[1, 3, 9]] = True
    for normalize in (False, True):
        woodtaylor = scorer(first_order=0.0, normalize_update=normalize, normalize="first_order")
        obs = create("scorer", "obs", host=HOST)
        torch.testing.assert_close(woodtaylor.score(model.ctx), obs.score(model.ctx))
        torch.testing.assert_close(woodtaylor.compensate(model.ctx, pruned),
                                   obs.compensate(model.ctx, pruned))


def test_options_defaults_and_validation() -> None:
    options = WoodTaylorConfig()
    assert options.first_order == 1.0
    # the exact method by default; the reference's normalisation and ranking are options
    assert not options.normalize_update and options.normalize == "reference"
    assert options.normalize_update_mult == 1.0 and options.ranking == "exact"
    assert options.mean_gradient == "labels"
    with pytest.raises(ValueError, match=r"first_order must be >= 0, got -1.0"):
        WoodTaylorConfig(first_order=-1)
    with pytest.raises(ValueError, match=r"normalize_update_mult must be > 0, got 0.0"):
        WoodTaylorConfig(normalize_update_mult=0)


# -- fidelity to the reference (woodtaylorblock.py), transcribed on the dense inverse --------------
def reference_stat(model: Quadratic) -> Tensor:
    """``_get_param_stat`` per parameter: term1 + term2 + term3 + term4, minus its min, + 1e-10.

    term1 + term2 + term4 = ½(w − u)²/d (the eps inside the reference's denominators dropped);
    term3 = −½ ḡ_lᵀu_l with u_l = F_l⁻¹ḡ_l, the parameter's own block inverse.
    """
    u, diag = model.u, model.inverse.diagonal()
    out = torch.empty_like(model.w)
    for layer in range(model.n_params):
        sel = model.param == layer
        w_l, u_l, d_l, g_l = model.w[sel], u[sel], diag[sel], model.gbar[sel]
        stat = 0.5 * w_l**2 / d_l + 0.5 * u_l**2 / d_l - 0.5 * (u_l @ g_l) - w_l * u_l / d_l
        out[sel] = stat - stat.min() + 1e-10
    return out


@settings(max_examples=30, deadline=None)
@given(problem=quadratics())
def test_reference_ranking_is_the_reference_statistic(ref, problem: dict) -> None:
    model = Quadratic(ref, **problem)
    got = scorer(ranking="reference").score(model.ctx)
    expected = reference_stat(model)
    scale = float(expected.abs().max()) + 1.0
    assert float((got - expected).abs().max()) <= 1e3 * model.tol * scale
    # within one parameter it ranks as the exact score does (a per-parameter shift)
    exact = scorer().score(model.ctx)
    for layer in range(model.n_params):
        sel = model.param == layer
        diff = (got[sel] - exact[sel]) - (got[sel] - exact[sel])[0]
        assert float(diff.abs().max()) <= 1e3 * model.tol * scale


def reference_update(model: Quadratic, pruned: Tensor, mult: float) -> Tensor:
    """``_get_weight_update`` per parameter: F⁻¹ · scaled basis − u, rescaled when too long."""
    basis = torch.where(pruned, -(model.w - model.u) / model.inverse.diagonal(), 0.0)
    full = model.inverse @ basis - model.u
    out = torch.empty_like(full)
    for layer in range(model.n_params):
        sel = model.param == layer
        update, norm_w = full[sel].clone(), torch.linalg.vector_norm(model.w[sel])
        # ‖δ_l‖ = ‖w_l‖ exactly (a lone pruned weight: δ = −w) is a tie round-off decides
        assume(abs(float(torch.linalg.vector_norm(update) - norm_w)) > 1e-6 * float(norm_w))
        if torch.linalg.vector_norm(update) > norm_w:
            update /= torch.linalg.vector_norm(update) / (norm_w * mult) + 1e-9
        out[sel] = update
    return out


@settings(max_examples=30, deadline=None)
@given(problem=quadratics(), mult=st.sampled_from([1e-3, 0.1, 1.0]), data=st.data())
def test_reference_normalisation_rescales_the_whole_update(ref, problem: dict, mult, data):
    model = Quadratic(ref, **problem)
    pruned = draw_pruned(data, model.w.numel())
    woodtaylor = scorer(normalize_update=True, normalize_update_mult=mult)
    got = woodtaylor.compensate(model.ctx, pruned)
    expected = reference_update(model, pruned, mult)
    scale = model.weight_scale(expected)
    assert float((got - expected).abs().max()) <= 1e3 * model.tol * scale
    assert woodtaylor.predicted_loss_change(model.ctx, pruned) is None
    # scores are the exact method's
    torch.testing.assert_close(woodtaylor.score(model.ctx), scorer().score(model.ctx))


def test_default_is_the_exact_unclipped_method(ref) -> None:
    """Defaults: δ = −u − F⁻¹z exactly (the dense KKT move), even when ‖u‖ ≫ ‖w‖."""
    model = Quadratic(ref, sizes=(5, 3), block_size=4, damping=0.05, seed=3)
    model.ctx.weights.mul_(1e-3)
    model.w.mul_(1e-3)
    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[[0, 6]] = True
    default = WoodTaylorScorer()
    got = default.compensate(model.ctx, pruned)
    basis = torch.where(pruned, (model.w - model.u) / model.inverse.diagonal(), 0.0)
    expected = -(model.u + model.inverse @ basis)
    assert float(torch.linalg.vector_norm(model.u)) > 10 * float(torch.linalg.vector_norm(model.w))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)




def test_mean_gradient_uses_the_data_labels_under_the_true_fisher() -> None:
    """fisher = "true": ḡ is ∇ of the mean data-label loss over num_grads × mini-batch samples
    (pruned coordinates zero), not the mean of the sampled-label gradients in ctx.mean_grad."""
    from curvprune import select_parameters
    from curvprune.testing.dense import DenseConfig, DenseEstimator

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    layout = select_parameters(model, ignore=[])
    d = layout.d
    xs, ys = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    mask = torch.rand(d) < 0.8
    est = DenseEstimator(DenseConfig(num_grads=4, fisher_mini_batch=4, fisher="true",
                                     dtype="float64", damping=0.1))
    est.setup(layout.sizes)
    est.update(torch.randn(4, d, dtype=torch.float64) * mask)

    def batches(num_samples=None):
        for start in range(0, num_samples, 5):  # batches of 5, the last one cut
            stop = min(start + 5, num_samples)
            yield xs[start:stop], ys[start:stop]

    sampled_mean = torch.randn(d, dtype=torch.float64)
    ctx = PruneContext(model=model, layout=layout, weights=layout.gather(model), mask=mask,
                       target_sparsity=0.5, estimator=est, mean_grad=sampled_mean,
                       batches=batches, loss_fn=nn.functional.cross_entropy)
    loss = nn.functional.cross_entropy(model(xs[:16]), ys[:16])
    expected = layout.flatten(torch.autograd.grad(loss, layout.parameters(model))) * mask
    labels = scorer()
    labels.score(ctx)
    torch.testing.assert_close(labels._gbar, expected, rtol=1e-12, atol=1e-12)
    fed = scorer(mean_gradient="estimator")
    fed.score(ctx)
    torch.testing.assert_close(fed._gbar, sampled_mean)
