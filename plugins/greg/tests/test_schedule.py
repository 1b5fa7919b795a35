"""The penalty, the growth formula, the phases and the early stop of the greg state machine.

Weights stay fixed here (no optimizer step), so the schedule's arithmetic is checked against
formulas written from the paper and memo §1.4/§1.5, exactly (float64, one rounding of k·δλ).
"""

from __future__ import annotations

import math

import pytest
import torch

import curvprune
from curvprune_greg import GRegSchedule

from .conftest import bound_schedule, expand, reference_pick, tiny_cnn


def _where(mask, a, b):
    """a where mask else b, in float64 (Python scalars would make float32)."""
    out = torch.full(mask.shape, b, dtype=torch.float64)
    out[mask] = a
    return out


def _set_grads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("granularity", ["filter", "channel", "weight"])
def test_penalty_is_exactly_lambda_times_w_on_the_chosen_groups(granularity):
    model = tiny_cnn()
    schedule, layout = bound_schedule(model, 0.5, granularity=granularity, update_reg_interval=3,
                                      reg_granularity_prune=0.125)
    for step in range(5):  # updates at 0 and 3: λ = 0.125, 0.125, 0.125, 0.25, 0.25
        before = _set_grads(model, seed=step)
        schedule.before_optimizer_step(step, model, layout)
        lam_value = 0.125 * (step // 3 + 1)
        for name, p in model.named_parameters():
            plan = next((q for q in schedule.plans if q.name == name), None)
            if plan is None or plan.n_pruned == 0:  # biases, excluded layers: untouched
                assert torch.equal(p.grad, before[name]), name
                continue
            picked = reference_pick(p, granularity, 0.5)
            lam = expand(picked.double() * lam_value, p.shape, granularity)
            torch.testing.assert_close(p.grad, before[name] + lam * p.detach(), rtol=0, atol=0)
    excluded = {q.name: q.excluded for q in schedule.plans if q.excluded}
    if granularity == "filter":  # the classifier's rows are the outputs
        assert list(excluded) == ["5.weight"]
    elif granularity == "channel":  # the first conv's input channels are the data's
        assert list(excluded) == ["0.weight"]
    else:
        assert excluded == {}


def test_growth_formula_phases_and_removal():
    """λ_t = (⌊t/K_u⌋ + 1)·δλ; leave at the first k with k·δλ > τ; remove K_s later."""
    model = tiny_cnn()
    k_u, k_s, delta, tau = 3, 4, 0.25, 1.0
    schedule, layout = bound_schedule(
        model, 0.5, update_reg_interval=k_u, reg_granularity_prune=delta, reg_upper_limit=tau,
        stabilize_reg_interval=k_s, mag_ratio_limit=1e30)
    k_star = 5  # 5·0.25 > 1, 4·0.25 = 1 is not
    leave = (k_star - 1) * k_u
    removal = leave + k_s
    assert schedule.max_steps() == removal + 1
    levels = []
    for step in range(removal + 3):
        _set_grads(model)
        schedule.before_optimizer_step(step, model, layout)
        updates = min(step // k_u + 1, k_star)
        for name, lam in schedule.lambdas().items():
            picked = schedule.pruned_groups()[name]
            assert torch.equal(lam, _where(picked, updates * delta, 0.0).to(lam.dtype))
        phase = "grow" if step < leave else "stabilize" if step <= removal else "removed"
        assert schedule.phase == phase, step
        levels.append(schedule.level_at(step, 0.5))
        assert schedule.finished(step) == (step >= removal)
    assert [i for i, lv in enumerate(levels) if lv is not None] == [removal]
    assert schedule.events == [(0, "grow"), (leave, "stabilize"), (removal, "removed")]
    # After removal: no penalty at all.
    before = _set_grads(model)
    schedule.before_optimizer_step(removal + 5, model, layout)
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())


def test_level_is_the_fraction_of_units_removed():
    model = tiny_cnn()
    schedule, _ = bound_schedule(model, 0.5, stabilize_reg_interval=0)
    # filter: conv 6 → 3, conv 5 → 3 (ceil 2.5), classifier excluded: 6 of 14 channels.
    assert [p.n_pruned for p in schedule.plans] == [3, 3, 0]
    assert schedule.removal_level() == pytest.approx(6 / 14)


def test_magnitude_ratio_ema_and_early_stop():
    """EMA ← 0.9·EMA + 0.1·ρ (the first ρ starts it); stop once every pruned layer's EMA ≥ limit."""
    model = tiny_cnn()
    schedule, layout = bound_schedule(model, 0.5, update_reg_interval=2, reg_granularity_prune=1e-3,
                                      mag_ratio_limit=100.0)
    picked = schedule.pruned_groups()
    params = dict(model.named_parameters())
    with torch.no_grad():  # kept groups: mean |w| = 1; pruned: 0.1, so ρ₁ = 10
        for name, mask in picked.items():
            w = params[name]
            w.copy_(torch.sign(w) * expand(_where(mask, 0.1, 1.0), w.shape, "filter"))
    _set_grads(model)
    schedule.before_optimizer_step(0, model, layout)
    assert schedule.magnitude_ratios() == pytest.approx({n: 10.0 for n in picked}, rel=1e-12)
    with torch.no_grad():  # pruned groups 100× smaller: ρ₂ = 1000, EMA = 9 + 100 = 109 ≥ 100
        for name, mask in picked.items():
            params[name].mul_(expand(_where(mask, 0.01, 1.0), params[name].shape, "filter"))
    _set_grads(model)
    schedule.before_optimizer_step(1, model, layout)  # not an update iteration
    assert schedule.phase == "grow"
    schedule.before_optimizer_step(2, model, layout)
    assert schedule.magnitude_ratios() == pytest.approx({n: 109.0 for n in picked}, rel=1e-12)
    assert schedule.phase == "stabilize" and schedule.events[-1] == (2, "stabilize")
    assert schedule.max_lambda == pytest.approx(2e-3) and schedule.max_lambda < 1.0


def test_weight_mode_stops_on_tau_only():
    model = tiny_cnn()
    schedule, layout = bound_schedule(model, 0.5, granularity="weight", update_reg_interval=1,
                                      reg_granularity_prune=0.5, mag_ratio_limit=1e-9)
    for step in range(3):
        _set_grads(model)
        schedule.before_optimizer_step(step, model, layout)
    assert schedule.magnitude_ratios() == {}
    assert schedule.events == [(0, "grow"), (2, "stabilize")]  # 3·0.5 > 1


def test_greg2_pick_then_grow_with_recover_on_kept():
    model = tiny_cnn()
    schedule, layout = bound_schedule(
        model, 0.5, variant=2, update_reg_interval=1, reg_granularity_pick=0.25,
        reg_upper_limit_pick=0.5, reg_granularity_prune=0.25, reg_upper_limit=1.0,
        reg_granularity_recover=-0.125, mag_ratio_limit=1e30)
    _set_grads(model)
    schedule.before_optimizer_step(0, model, layout)
    assert schedule.phase == "pick" and schedule.pruned_groups() == {}
    assert all(torch.equal(lam, torch.full_like(lam, 0.25)) for lam in schedule.lambdas().values())
    schedule.before_optimizer_step(1, model, layout)  # λ = 0.5 ≥ τ_pick: pick by current |w|
    assert schedule.phase == "grow"
    for name, picked in schedule.pruned_groups().items():
        assert torch.equal(picked, reference_pick(dict(model.named_parameters())[name], "filter", 0.5))
    schedule.before_optimizer_step(2, model, layout)  # pruned 0.5 + 0.25, kept −0.125
    for name, lam in schedule.lambdas().items():
        picked = schedule.pruned_groups()[name]
        assert torch.equal(lam, torch.where(picked, 0.75, -0.125).to(lam.dtype))
    schedule.before_optimizer_step(3, model, layout)  # 1.0: not > τ
    schedule.before_optimizer_step(4, model, layout)  # 1.25 > τ
    assert schedule.events == [(0, "pick"), (1, "grow"), (4, "stabilize")]
    assert schedule.max_steps() == 4 + 40000 + 1


def test_ratios_selectors_and_the_keep_one_rule():
    model = tiny_cnn()
    with pytest.warns(UserWarning, match="keeps 1"):
        schedule, _ = bound_schedule(model, 0.0, ratios={"0": 0.99, "re:2\\..*": 0.3})
    assert [(p.ratio, p.n_pruned) for p in schedule.plans] == [(0.99, 5), (0.3, 2), (0.0, 0)]
    with pytest.raises(curvprune.ConfigError, match=r"'conv9' matches no pruned parameter .*@ schedule.ratios"):
        bound_schedule(model, 0.5, ratios={"conv9": 0.5})
    with pytest.raises(curvprune.ConfigError, match="did you mean '2.weight'"):
        bound_schedule(model, 0.5, ratios={"2.weigth": 0.5})
    with pytest.raises(curvprune.ConfigError, match="cannot be pruned in filter mode"):
        bound_schedule(model, 0.5, ratios={"5": 0.5})
    with pytest.raises(curvprune.ConfigError, match="matches two ratios selectors"):
        bound_schedule(model, 0.5, ratios={"0": 0.5, "re:0.*": 0.2})


def test_ceil_counts_the_ratio_as_exact():
    from curvprune_greg import num_pruned

    assert num_pruned(0.07, 100) == 7  # 0.07·100 = 7.000000000000001 in floating point
    assert num_pruned(0.3, 10) == 3 and num_pruned(0.31, 10) == 4
    assert num_pruned(0.5, 1) == 0 and num_pruned(0.999, 4) == 3 and num_pruned(0.0, 9) == 0
    assert all(num_pruned(r / 100, n) == min(math.ceil(r * n / 100 - 1e-9), n - 1)
               for r in range(100) for n in range(1, 60))


@pytest.mark.parametrize(("granularity", "prunable"), [("filter", "conv1"), ("channel", "conv2")])
def test_residual_rule_on_resnet18_leaves_the_streams_alone(granularity, prunable):
    """memo §2: only block-internal channels go (filter: each BasicBlock's conv1 outputs;
    channel: conv2's inputs, the same channels), so no residual stream changes width."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10)
    schedule, _ = bound_schedule(model, 0.5, granularity=granularity)
    pruned = [p.name for p in schedule.plans if p.n_pruned]
    assert pruned == [f"layer{s}.{b}.{prunable}.weight" for s in range(1, 5) for b in range(2)]
    assert all(p.n_pruned == p.n_groups // 2 for p in schedule.plans if p.n_pruned)
    excluded = {p.name: p.excluded for p in schedule.plans if p.excluded}
    if granularity == "filter":
        assert "coupled across a residual addition" in excluded["layer2.0.downsample.0.weight"]
        assert "reach the model output" in excluded["fc.weight"]
    else:
        assert "model's input" in excluded["conv1.weight"]
        assert "residual stream" in excluded["layer3.1.conv1.weight"]
    none, _ = bound_schedule(model, 0.5, granularity=granularity, residual="none")
    assert len([p for p in none.plans if p.n_pruned]) == len(none.plans) - 1


@pytest.mark.parametrize("variant", [1, 2])
def test_reg_affine_penalises_the_pruned_filters_gates_only(variant):
    """reg_affine: bias and BatchNorm γ, β of pruned filters get the filter's λ; nothing else does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(6 * 16, 3)).double()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    schedule, layout = bound_schedule(
        model, 0.5, variant=variant, reg_affine=True, update_reg_interval=1,
        reg_granularity_prune=0.125, reg_granularity_pick=0.25, reg_upper_limit_pick=0.5)
    gates = ("0.bias", "1.weight", "1.bias")
    for step in range(4):
        before = _set_grads(model, seed=step)
        schedule.before_optimizer_step(step, model, layout)
        params = dict(model.named_parameters())
        picked = schedule.pruned_groups().get("0.weight")
        for name in gates:
            if picked is None:  # GReg-2's uniform phase: weights only
                assert torch.equal(params[name].grad, before[name]), (step, name)
                continue
            lam = torch.where(picked, schedule.lambdas()["0.weight"], 0.0)
            # λ = 0.625 is not a power of two: a fused multiply-add may round λ·w once less (the
            # values are O(1), so 4 ulps of float64 bound the difference).
            torch.testing.assert_close(params[name].grad, before[name] + lam * params[name].detach(),
                                       rtol=0, atol=4 * torch.finfo(torch.float64).eps)
    assert schedule.phase == "grow"


def _script_magnitudes(model, table):
    """Set every filter of each layer in ``table`` to sign(w)·m_j (mean |w| = m_j exactly)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mags in table.items():
            w = params[name]
            mags = torch.tensor(mags, dtype=torch.float64)
            w.copy_(torch.where(w >= 0, 1.0, -1.0) * expand(mags, w.shape, "filter"))


def test_greg2_layers_stop_one_by_one_with_the_ema_kept_through_the_pick():
    """GReg-2 per layer, as the reference's ``_greg_2``/``_update_reg``: a scripted sequence of
    filter magnitudes; the EMA is transcribed from ``_update_mag_ratio`` (moving L1 set while
    picking, picked set after), each layer stops on its own EMA, a stopped layer's λ and EMA
    freeze while the other keeps growing, and ``grow`` ends when the last one stops."""
    model = tiny_cnn()
    delta_pick, tau_pick, delta, recover = 0.25, 0.5, 0.25, -0.125
    schedule, layout = bound_schedule(
        model, 0.5, variant=2, residual="none", update_reg_interval=1,
        reg_granularity_pick=delta_pick, reg_upper_limit_pick=tau_pick,
        reg_granularity_prune=delta, reg_upper_limit=10.0, reg_granularity_recover=recover,
        mag_ratio_limit=100.0, stabilize_reg_interval=3)
    a, b = "0.weight", "2.weight"  # 6 and 5 filters, 3 pruned in each; the classifier excluded
    low, high = [0.5] * 3 + [1.0] * 3, [1.0] * 3 + [0.25] * 3
    script = {  # step: (magnitudes of a, magnitudes of b)
        0: (low, [0.5] * 3 + [1.0] * 2),
        1: (high, [0.5] * 3 + [1.0] * 2),  # a's lowest set moved to {3, 4, 5}: picked there
        2: ([1.0] * 3 + [1e-3] * 3, [0.5] * 3 + [1.0] * 2),
        3: (low, [0.5] * 3 + [1.0] * 2),  # a finished: its EMA no longer moves
        4: (low, [0.5] * 3 + [1.0] * 2),
        5: (low, [1e-4] * 3 + [1.0] * 2),
    }

    def ratio(mags, pruned):
        mags = torch.tensor(mags, dtype=torch.float64)
        return float(mags[~pruned].mean() / mags[pruned].mean())

    ema: dict[str, float] = {}
    picked: dict[str, torch.Tensor] = {}
    finished: set[str] = set()
    for step in range(6):
        _script_magnitudes(model, dict(zip((a, b), script[step], strict=True)))
        _set_grads(model)
        schedule.before_optimizer_step(step, model, layout)
        for name, mags in zip((a, b), script[step], strict=True):
            if name in finished:
                continue
            if name in picked:
                current = picked[name]
            else:  # the moving L1 set: the 3 lowest now
                current = torch.zeros(len(mags), dtype=torch.bool)
                current[torch.argsort(torch.tensor(mags), stable=True)[:3]] = True
            rho = ratio(mags, current)
            ema[name] = rho if name not in ema else 0.9 * ema[name] + 0.1 * rho
        if step == 1:
            picked = schedule.pruned_groups()
            assert picked[a].tolist() == [False] * 3 + [True] * 3
            assert picked[b].tolist() == [True] * 3 + [False] * 2
        assert schedule.magnitude_ratios() == pytest.approx(ema, rel=1e-12), step
        finished |= {n for n in (a, b) if n in picked and ema[n] >= 100.0}
        assert schedule.finished_layers() == finished, step
    assert ema[a] == pytest.approx(0.9 * 2.2 + 0.1 * 1000.0)  # 101.98 at step 2
    lams = schedule.lambdas()
    # a stopped after one grow update (step 2), b after four (steps 2-5)
    assert torch.equal(lams[a], torch.where(picked[a], tau_pick + delta, recover).to(lams[a].dtype))
    assert torch.equal(lams[b], torch.where(picked[b], tau_pick + 4 * delta, recover)
                       .to(lams[b].dtype))
    assert schedule.events == [(0, "pick"), (1, "grow"), (5, "stabilize")]
    state = schedule.state_dict()
    again = GRegSchedule(schedule.config)
    again.load_state_dict(state)
    restored = again.state_dict()
    assert again.finished_layers() == finished
    assert restored["layer_updates"] == {a: 1, b: 4} == state["layer_updates"]


def test_reg_affine_leaves_alone_a_batchnorm_shared_through_a_cat():
    """After a torch.cat a BatchNorm holds several groups at offsets (DenseNet): only a BN with
    exactly the producer's channels is that producer's gate (issue 18)."""
    from curvprune.testing.nets import DenseCatNet
    from curvprune_greg.rules import gate_parameters

    model = DenseCatNet(stem=4, growth=3, layers=2)
    gates = gate_parameters(model, curvprune.select_parameters(model))
    assert gates["stem.weight"] == ["stem.bias", "norms.0.weight", "norms.0.bias"]
    assert gates["convs.0.weight"] == [] and gates["convs.1.weight"] == []
