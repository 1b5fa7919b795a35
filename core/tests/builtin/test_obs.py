"""The builtin ``obs`` scorer against the local quadratic model, with the exact ``dense`` inverse.

With L(w + δ) − L(w) = ½ δᵀFδ (a trained point, so no first-order term), OBS predicts:
removing weight q alone with δ = −F⁻¹e_q·w_q/[F⁻¹]_qq costs exactly ρ_q = w_q²/(2[F⁻¹]_qq) and
sets w_q + δ_q = 0; removing a set P jointly with δ = −F⁻¹E_P([F⁻¹]_PP)⁻¹w_P zeroes all of P,
minimises ½δᵀFδ over all δ with δ_P = −w_P, and costs ½ w_Pᵀ([F⁻¹]_PP)⁻¹w_P.
All checks run in float64, where these identities hold to round-off (relative 1e-9 leaves
room for cond(F) ≤ 1e5 here: damping ≥ 1e-2 against gradient entries ≤ 3).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune import PruneContext, select_parameters
from curvprune.testing.dense import damped_fisher


def _problem(seed: int, sizes: tuple[int, ...], m: int, damping: float, block_size: int | None):
    gen = torch.Generator().manual_seed(seed)
    d = sum(sizes)
    grads = torch.randn(m, d, generator=gen, dtype=torch.float64)
    weights = torch.randn(d, generator=gen, dtype=torch.float64)
    est = curvprune.create(
        "estimator", "dense", damping=damping, block_size=block_size, dtype="float64"
    )
    est.setup(sizes)
    est.update(grads)
    fisher = damped_fisher(grads, sizes, block_size, damping)
    model = nn.Sequential(*[nn.Linear(s, 1, bias=False) for s in sizes])
    layout = select_parameters(model, ["Linear"])
    ctx = PruneContext(
        model=model,
        layout=layout,
        weights=weights,
        mask=torch.ones(d, dtype=torch.bool),
        target_sparsity=0.5,
        estimator=est,
    )
    return ctx, fisher, weights


def _quadratic(fisher, delta):
    return 0.5 * delta @ fisher @ delta


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(1, 7), min_size=1, max_size=3).map(tuple),
    m=st.integers(1, 10),
    damping=st.floats(1e-2, 10.0),
    data=st.data(),
)
def test_single_weight_removal_matches_the_quadratic_model(seed, sizes, m, damping, data):
    ctx, fisher, w = _problem(seed, sizes, m, damping, None)
    q = data.draw(st.integers(0, sum(sizes) - 1))
    scorer = curvprune.create("scorer", "obs")
    rho = scorer.score(ctx)
    pruned = torch.zeros_like(ctx.mask)
    pruned[q] = True
    delta = scorer.compensate(ctx, pruned)
    assert abs(w[q] + delta[q]) <= 1e-9 * w.abs().max()
    change = _quadratic(fisher, delta)
    predicted = scorer.predicted_loss_change(ctx, pruned)
    torch.testing.assert_close(change, rho[q], rtol=1e-9, atol=0)
    torch.testing.assert_close(predicted, rho[q], rtol=1e-12, atol=0)
    # OBS saliency: the smallest loss of all updates that remove q (here: any other δ is worse)
    other = delta.clone()
    other[(q + 1) % len(w)] += 0.1 if len(w) > 1 else 0.0
    assert _quadratic(fisher, other) >= change - 1e-12


@settings(max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.lists(st.integers(2, 9), min_size=1, max_size=3).map(tuple),
    block_size=st.sampled_from([None, 2, 3, 4]),
    m=st.integers(1, 10),
    damping=st.floats(1e-2, 10.0),
    data=st.data(),
)
def test_joint_removal_solves_the_constrained_problem(seed, sizes, block_size, m, damping, data):
    ctx, fisher, w = _problem(seed, sizes, m, damping, block_size)
    d = len(w)
    chosen = data.draw(st.lists(st.integers(0, d - 1), min_size=1, max_size=d - 1, unique=True))
    pruned = torch.zeros(d, dtype=torch.bool)
    pruned[chosen] = True
    scorer = curvprune.create("scorer", "obs", joint=True)
    scorer.score(ctx)
    delta = scorer.compensate(ctx, pruned)
    predicted = scorer.predicted_loss_change(ctx, pruned)
    # pruned weights end exactly at zero (to round-off)
    assert (w[pruned] + delta[pruned]).abs().max() <= 1e-9 * w.abs().max()
    # the KKT solution of min ½δᵀFδ s.t. δ_P = −w_P: δ_K = F_KK⁻¹ F_KP w_P on the kept set K
    kept = ~pruned
    expected = torch.zeros(d, dtype=torch.float64)
    expected[pruned] = -w[pruned]
    if kept.any():
        expected[kept] = torch.linalg.solve(
            fisher[kept][:, kept], fisher[kept][:, pruned] @ w[pruned]
        )
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-9 * float(w.abs().max()))
    torch.testing.assert_close(predicted, _quadratic(fisher, delta), rtol=1e-8, atol=0)


def test_sum_of_single_updates_is_one_ihvp():
    ctx, fisher, w = _problem(3, (5, 4), 6, 0.1, None)
    pruned = torch.zeros(9, dtype=torch.bool)
    pruned[[1, 4, 7]] = True
    scorer = curvprune.create("scorer", "obs")
    scorer.score(ctx)
    delta = scorer.compensate(ctx, pruned)
    inverse = torch.linalg.inv(fisher)
    singles = sum(-inverse[:, q] * w[q] / inverse[q, q] for q in (1, 4, 7))
    torch.testing.assert_close(delta, singles, rtol=1e-10, atol=1e-12)


def test_update_false_returns_no_update_and_magnitude_never_updates():
    ctx, _, _ = _problem(0, (4,), 3, 1.0, None)
    pruned = torch.tensor([True, False, False, False])
    assert curvprune.create("scorer", "obs", update=False).compensate(ctx, pruned) is None
    assert curvprune.create("scorer", "magnitude").compensate(ctx, pruned) is None


def test_with_zero_gradients_obs_ranks_like_magnitude():
    # F = λI, so ρ_q = λ w_q²/2: the OBS order is the magnitude order (memo §6, item 8)
    ctx, _, w = _problem(1, (6, 3), 1, 0.5, None)
    ctx.estimator.setup((6, 3))
    ctx.estimator.update(torch.zeros(2, 9, dtype=torch.float64))
    rho = curvprune.create("scorer", "obs").score(ctx)
    torch.testing.assert_close(rho, 0.5 * w.square() / 2, rtol=1e-12, atol=0)


def test_joint_group_limit_is_a_config_error():
    ctx, _, _ = _problem(0, (8,), 3, 1.0, None)
    scorer = curvprune.create("scorer", "obs", joint=True, max_joint_group=2)
    scorer.score(ctx)
    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[:3] = True
    try:
        scorer.compensate(ctx, pruned)
    except curvprune.ConfigError as exc:
        assert "max_joint_group" in str(exc) and "@ scorer.joint" in str(exc)
    else:
        raise AssertionError("expected a ConfigError")


def test_channel_magnitude_scores_are_channel_norms():
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 2, bias=False))
    layout = select_parameters(model, ["Linear"])
    w = layout.gather(model)
    ctx = PruneContext(model=model, layout=layout, weights=w, mask=torch.ones(10, dtype=torch.bool),
                       target_sparsity=0.5)
    scores = curvprune.create(
        "scorer", "magnitude", granularity="channel", normalize="none"
    ).score(ctx)
    expected = torch.cat([model[0].weight.detach().norm(dim=1), model[1].weight.detach().norm(dim=1)])
    torch.testing.assert_close(scores, expected)
