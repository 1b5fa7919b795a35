"""The loss-change audit: exact on a quadratic problem, correct rank statistics, run output.

The exact case: a linear model y = xᵀw with loss ½·mean (xᵀw − y)². Its Hessian is XᵀX/n. The
data come in pairs (x, y) and (x, y'), built so that at w* the residuals are +1 and −1: the
gradient Σ rᵢxᵢ vanishes (w* is the minimum) and the per-sample gradients rᵢxᵢ = ±xᵢ give the
empirical Fisher (1/n)Σ xᵢxᵢᵀ = XᵀX/n, the Hessian itself. With damping 1e-10 against
eigenvalues ≥ ~0.1, the quadratic model of OBS is exact up to a relative 1e-9: each single-weight
prediction ρ_q = w_q²/(2[F⁻¹]_qq) must equal the measured loss change after the OBS update,
and so must the joint prediction for a whole step.

Away from the minimum (residual signs that do not cancel, still |rᵢ| = 1, so the empirical
Fisher is still the Hessian) the loss is still exactly quadratic: the measured change of any
move δw is ∇Lᵀδw + ½δwᵀHδw with no remainder, and with a large damping λ the OBS prediction
ρ_q = ½δwᵀ(H + λI)δw. The audit's split (first-order part, damping part) must then recover
measured − ∇Lᵀδw = ρ_q − ½λ‖δw‖² for every weight, to round-off.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import Pipeline
from curvprune.pipeline.audit import audit_single_weights, pearson, spearman

P, PAIRS = 12, 24


def quadratic_problem(seed: int = 0, stationary: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(PAIRS, P, generator=g, dtype=torch.float64)
    w_star = torch.randn(P, generator=g, dtype=torch.float64)
    xs = torch.cat([x, x])  # each input twice
    if stationary:  # residuals +1 and -1 on each pair: zero gradient
        residuals = torch.cat([torch.ones(PAIRS), -torch.ones(PAIRS)]).double()
    else:  # random signs: |rᵢ| = 1 keeps Fisher = Hessian, the gradient is not zero
        residuals = torch.randint(0, 2, (2 * PAIRS,), generator=g).double() * 2 - 1
    ys = xs @ w_star - residuals
    model = nn.Linear(P, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star)
    return model, [(xs, ys.unsqueeze(1))]


def half_mse(out, y):
    return 0.5 * (out - y).square().mean()


def pipeline(sparsity: float, joint: bool, audit: int, damping: float = 1e-10,
             update: bool = True) -> Pipeline:
    n = 2 * PAIRS
    return Pipeline.from_config({
        "prune": {"sparsity": sparsity, "loss_samples": n, "audit_single": audit},
        "estimator": {"name": "dense", "damping": damping, "num_grads": n, "dtype": "float64"},
        "scorer": {"name": "obs", "joint": joint, "update": update},
        "schedule": {"name": "oneshot", "steps": 1},
    })


def test_single_weight_predictions_are_exact_for_a_quadratic_loss():
    model, data = quadratic_problem()
    before = model.weight.detach().clone()
    result = pipeline(0.25, joint=True, audit=P).prune(model, data, loss_fn=half_mse)
    (step,) = result.steps
    audit = step.single_audit
    assert audit is not None and audit["samples"] == P and sorted(audit["index"]) == list(range(P))
    predicted, measured = torch.tensor(audit["predicted"]), torch.tensor(audit["measured"])
    assert (predicted > 0).all()
    torch.testing.assert_close(measured, predicted, rtol=1e-7, atol=1e-12)
    assert audit["spearman"] == pytest.approx(1.0) and audit["pearson"] == pytest.approx(1.0)
    # the whole step, with the joint OBS update, is exact too
    assert step.measured_loss_change == pytest.approx(step.predicted_loss_change, rel=1e-7)
    # the audit itself leaves the model alone: only the step's pruning changed it
    assert int((model.weight == 0).sum()) == 3
    kept = model.weight.detach() != 0
    assert not torch.equal(model.weight.detach()[kept], before[kept]), "the OBS update was applied"


def test_audit_checks_the_summed_update_against_its_own_prediction():
    """Without joint, the step prediction Σρ_q is not exact, but each single removal still is."""
    model, data = quadratic_problem(seed=1)
    (step,) = pipeline(0.5, joint=False, audit=5).prune(model, data, loss_fn=half_mse).steps
    audit = step.single_audit
    assert audit["samples"] == 5
    torch.testing.assert_close(torch.tensor(audit["measured"]), torch.tensor(audit["predicted"]),
                               rtol=1e-7, atol=1e-12)


def test_audit_splits_first_order_and_damping_parts_exactly_off_the_minimum():
    model, data = quadratic_problem(seed=2, stationary=False)
    (xs, ys), = data
    w = model.weight.detach().flatten().clone()
    gradient = xs.T @ (xs @ w - ys.squeeze(1)) / xs.shape[0]  # ∇L of ½·mean(xᵀw − y)²
    assert gradient.norm() > 0.1, "the problem must be away from its minimum"
    damping = 0.3  # against Hessian eigenvalues ~0.1-3: the damping part is far from negligible
    (step,) = pipeline(0.25, joint=False, audit=P, damping=damping).prune(
        model, data, loss_fn=half_mse).steps
    audit = step.single_audit
    predicted = torch.tensor(audit["predicted"], dtype=torch.float64)
    measured = torch.tensor(audit["measured"], dtype=torch.float64)
    first = torch.tensor(audit["first_order"], dtype=torch.float64)
    damp = torch.tensor(audit["damping_part"], dtype=torch.float64)
    # dense ground truth for every removal: δw = −w_q F⁻¹e_q/[F⁻¹]_qq with F = XᵀX/n + λI
    hessian = xs.T @ xs / xs.shape[0]
    inverse = torch.linalg.inv(hessian + damping * torch.eye(P, dtype=torch.float64))
    index = torch.tensor(audit["index"])
    moves = -(w[index] / inverse.diagonal()[index]).unsqueeze(1) * inverse[:, index].T
    torch.testing.assert_close(first, moves @ gradient, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(damp, 0.5 * damping * moves.square().sum(1), rtol=1e-9, atol=1e-12)
    # the loss is exactly quadratic and Fisher = Hessian: both splits agree to round-off
    torch.testing.assert_close(measured - first, predicted - damp, rtol=1e-7, atol=1e-12)
    assert (damp / predicted).max() > 0.1, "the damping part must matter in this test"
    assert audit["spearman_curvature"] == pytest.approx(1.0)
    assert audit["spearman_first_order"] is not None


def test_audit_records_no_split_for_a_prediction_that_is_not_a_quadratic_form():
    model, data = quadratic_problem(stationary=False)
    (step,) = pipeline(0.25, joint=False, audit=4, update=False).prune(
        model, data, loss_fn=half_mse).steps
    audit = step.single_audit
    assert audit["first_order"] is None and audit["damping_part"] is None
    assert audit["spearman_curvature"] is None and audit["spearman_first_order"] is None
    assert audit["spearman"] is not None


def test_audit_is_off_by_default_and_skipped_for_scorers_without_prediction():
    model, data = quadratic_problem()
    (step,) = pipeline(0.25, joint=False, audit=0).prune(model, data, loss_fn=half_mse).steps
    assert step.single_audit is None
    model, data = quadratic_problem()
    magnitude = Pipeline.from_config({"prune": {"sparsity": 0.25, "audit_single": 4}})
    (step,) = magnitude.prune(model, data, loss_fn=half_mse).steps
    assert step.single_audit is None


def test_audit_needs_loss_samples():
    from curvprune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"loss_samples > 0 .*@ prune.audit_single"):
        Pipeline.from_config({"prune": {"loss_samples": 0, "audit_single": 8}})


def test_audit_function_samples_only_present_weights():
    from curvprune import PruneContext, select_parameters
    from curvprune.builtin.scorers import OBSScorer
    from curvprune.testing.dense import DenseConfig, DenseEstimator

    model, data = quadratic_problem()
    layout = select_parameters(model, ("Linear",), ())
    mask = torch.ones(P, dtype=torch.bool)
    mask[:4] = False
    est = DenseEstimator(DenseConfig(damping=1e-10, dtype="float64"))
    est.setup(layout.sizes)
    est.update(data[0][0])  # rows xᵢ: F = λI + XᵀX/n exactly
    weights = layout.gather(model) * mask
    ctx = PruneContext(model=model, layout=layout, weights=weights, mask=mask,
                       target_sparsity=0.5, estimator=est, loss_fn=half_mse)
    scorer = OBSScorer()
    scorer.score(ctx)
    audit = audit_single_weights(ctx, scorer, data, samples=100)
    assert audit is not None and sorted(audit.index.tolist()) == list(range(4, P))
    assert not torch.equal(model.weight.detach().flatten() * mask, torch.zeros(P))
    assert audit.summary()["samples"] == P - 4


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=3, max_size=30))
def test_spearman_matches_a_dense_reference(values):
    x = torch.tensor(values, dtype=torch.float64)
    y = torch.arange(len(values), dtype=torch.float64).flip(0) ** 2 + x
    # reference: average ranks by counting (O(n²)), then Pearson's formula
    def ranks(v):
        return torch.stack([(v < a).sum() + ((v == a).sum() - 1) / 2 for a in v]).double()
    rx, ry = ranks(x), ranks(y)
    expected = pearson(rx, ry)
    got = spearman(x, y)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_spearman_is_rank_invariant_and_signed():
    x = torch.linspace(0.1, 3, 20, dtype=torch.float64)
    assert spearman(x, x.exp()) == pytest.approx(1.0)
    assert spearman(x, -x**3) == pytest.approx(-1.0)
    assert spearman(x[:1], x[:1]) is None and spearman(x, torch.ones_like(x)) is None


def test_run_writes_audit_plot_and_correlation(tmp_path):
    from curvprune.run.execute import execute_run

    config = {
        "model": {"name": "digits-mlp", "kwargs": {"hidden": [16, 16]}},
        "train": {"epochs": 2},
        "prune": {"sparsity": 0.5, "loss_samples": 64, "audit_single": 16},
        "estimator": {"name": "dense", "block_size": 16, "damping": 1e-3, "num_grads": 32},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 2},
        "run": {"progress": False},
    }
    outcome = execute_run(config, out=tmp_path, name="audit", quiet=True)
    record = json.loads((outcome.run_dir / "result.json").read_text())
    single = record["loss_change"]["single"]
    assert [s["step"] for s in single] == [0, 1] and all(s["samples"] == 16 for s in single)
    assert all(-1.0 <= s["spearman"] <= 1.0 for s in single)
    assert len(record["steps"][0]["single_audit"]["measured"]) == 16
    assert (outcome.run_dir / "single_weight_audit.png").stat().st_size > 1000
    report = (outcome.run_dir / "report.md").read_text()
    assert "## Loss-change audit" in report and "Spearman ρ" in report
