"""GReg-2's premise (memo §1.6) on a diagonal quadratic with known curvatures.

Loss L(w) = ½ Σ_j h_j (w_j − w*_j)², started at the minimum w = w*, with |w*_j| = 1 for every
weight so that only the curvature tells them apart. Under a uniform penalty λ the minimiser is
ŵ_j = h_j w*_j / (h_j + λ): the flatter a direction, the more it shrinks. SGD on the penalised
loss keeps that order at every step, not just at equilibrium: with a = 1 − lr·(h + λ) > 0 the
step maps |w| to a·|w| + lr·h, and for h₁ > h₂ the gap |w₁| − |w₂| stays ≥ 0 (it is multiplied by
a > 0 and gains lr·(h₁ − h₂)·(1 − |w₂|) ≥ 0). So when GReg-2 picks (λ = τ_pick) magnitude picks
exactly the n_p lowest curvatures; the test checks that on drawn curvatures.

Groups are single weights (``granularity = "weight"``): the diagonal model has no structure.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune_greg import GRegConfig, GRegSchedule


@st.composite
def curvatures(draw: st.DrawFn) -> list[float]:
    """3-10 distinct curvatures in [0.1, 5], at least 5 % apart (so float64 ties cannot occur)."""
    n = draw(st.integers(3, 10))
    values = draw(st.lists(st.floats(0.1, 5.0), min_size=n, max_size=n))
    values.sort()
    for i in range(1, n):
        values[i] = max(values[i], values[i - 1] * 1.05)
    order = draw(st.permutations(range(n)))
    return [values[i] for i in order]


@pytest.mark.filterwarnings("ignore:greg. ratio")
@settings(max_examples=12, deadline=None)
@given(h=curvatures(), signs=st.lists(st.sampled_from([-1.0, 1.0]), min_size=10, max_size=10),
       ratio=st.sampled_from([0.2, 0.5, 0.8]))
def test_uniform_growth_picks_the_flattest_directions(h, signs, ratio):
    n = len(h)
    model = nn.Sequential(nn.Linear(n, 1, bias=False)).double()
    target = torch.tensor(signs[:n], dtype=torch.float64)[None, :]
    curvature = torch.tensor(h, dtype=torch.float64)[None, :]
    with torch.no_grad():
        model[0].weight.copy_(target)
    schedule = GRegSchedule(GRegConfig(
        variant=2, granularity="weight", update_reg_interval=1, reg_granularity_pick=0.02,
        reg_upper_limit_pick=1.0, reg_upper_limit=2.0))
    layout = curvprune.select_parameters(model)
    schedule.bind(model, layout, ratio)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # lr·(h + λ) ≤ 0.6 < 1
    step = 0
    while schedule.phase == "pick":
        optimizer.zero_grad()
        loss = 0.5 * (curvature * (model[0].weight - target) ** 2).sum()
        loss.backward()
        schedule.before_optimizer_step(step, model, layout)
        optimizer.step()
        step += 1
    assert step == 50  # τ_pick / δλ_pick updates, the last one picks
    picked = schedule.pruned_groups()["0.weight"]
    n_p = int(picked.sum())
    assert 1 <= n_p < n
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.argsort(curvature.squeeze(0))[:n_p]] = True
    assert torch.equal(picked, expected), (h, picked)
    # And the shrinkage itself follows h/(h + λ) in order: flatter directions are smaller.
    magnitude = model[0].weight.detach().abs().squeeze(0)
    assert torch.all(magnitude[picked].max() < magnitude[~picked].min())
