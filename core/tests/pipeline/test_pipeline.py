"""Pipeline construction, one-shot pruning, sessions in a training loop, and failure safety."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune import ConfigError, NumericalError, Pipeline, hookimpl
from curvprune.run.models import DigitsMLP


def _data(n=96, seed=0, nan=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    if nan:
        x[3, 0, 0, 0] = float("nan")
    return DataLoader(TensorDataset(x, y), batch_size=16)


def _model(seed=0):
    torch.manual_seed(seed)
    return DigitsMLP()


def _config(**tables):
    base = {
        "prune": {"sparsity": 0.8, "loss_samples": 32},
        "estimator": {"name": "dense", "block_size": 16, "damping": 1e-2, "num_grads": 16},
        "scorer": {"name": "obs"},
        "schedule": {"name": "oneshot", "steps": 2},
        "mask": {"name": "global"},
    }
    for key, value in tables.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def test_oneshot_prunes_to_target_and_reports_each_step():
    model = _model()
    pipe = Pipeline.from_config(_config())
    result = pipe.prune(model, _data())
    layout = pipe.select(model)
    assert len(result.steps) == 2
    assert result.steps[-1].target_sparsity == 0.8
    assert abs(result.sparsity - 0.8) <= 1 / layout.d
    flat = layout.gather(model)
    assert torch.equal(flat == 0, ~result.masks.flat | (flat == 0))
    assert bool((flat[~result.masks.flat] == 0).all())
    for step in result.steps:
        assert step.predicted_loss_change is not None and step.predicted_loss_change >= 0
        assert step.loss_before is not None and step.loss_after is not None
        assert step.num_grads == 16
    assert result.steps[0].sparsity < result.steps[1].sparsity


def test_hooks_fire_in_order():
    calls = []

    class Observer:
        @hookimpl
        def curvprune_pipeline_start(self, pipeline, model):
            calls.append("start")

        @hookimpl
        def curvprune_after_prune_step(self, report):
            calls.append(f"step{report.step}")

        @hookimpl
        def curvprune_pipeline_end(self, result):
            calls.append("end")

    host = curvprune.get_plugin_manager(plugins=[("observer", Observer())])
    Pipeline.from_config(_config(), host=host).prune(_model(), _data())
    assert calls == ["start", "step0", "step1", "end"]


def test_structured_scorer_with_unstructured_mask_is_rejected_before_compute():
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(_config(
            estimator=None,
            scorer={"name": "magnitude", "granularity": "channel"},
            mask={"name": "global"},
        ))
    assert "scores channels" in str(info.value) and "@ mask" in str(info.value)


def test_curvature_scorer_without_estimator_is_rejected():
    with pytest.raises(ConfigError, match=r"needs a curvature estimator.*@ estimator"):
        Pipeline.from_config(_config(estimator=None))


def test_gradual_schedule_refuses_oneshot_prune():
    pipe = Pipeline.from_config(_config(schedule={"name": "gradual", "start": 0, "end": 10,
                                                  "frequency": 5}))
    with pytest.raises(ConfigError, match="attach"):
        pipe.prune(_model(), _data())


def test_nan_inputs_raise_and_leave_the_model_unchanged():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline.from_config(_config(prune={"sparsity": 0.5, "loss_samples": 0}))
    with pytest.raises(NumericalError, match=r"non-finite gradients in '1\.weight'"):
        pipe.prune(model, _data(nan=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_failing_plugin_leaves_the_model_unchanged():
    class Exploding(curvprune.SaliencyScorer):
        def score(self, ctx):
            return ctx.weights.abs()

        def compensate(self, ctx, pruned):
            raise RuntimeError("boom")

    class Plugin:
        @hookimpl
        def curvprune_register_saliency_scorers(self, register):
            register("exploding", Exploding)

    host = curvprune.get_plugin_manager(plugins=[("exploding", Plugin())])
    pipe = Pipeline.from_config(_config(estimator=None, scorer={"name": "exploding"}), host=host)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        pipe.prune(model, _data())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_masks_survive_training_with_momentum_and_weight_decay():
    model = _model()
    pipe = Pipeline.from_config(_config(estimator=None, scorer={"name": "magnitude"},
                                        schedule={"name": "oneshot"}))
    result = pipe.prune(model, _data())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    session = pipe.attach(model, optimizer, masks=result.masks)
    layout = pipe.select(model)
    for x, y in _data(seed=1):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        session.step()
    flat = layout.gather(model)
    assert bool((flat[~result.masks.flat] == 0).all())
    assert bool((flat[result.masks.flat] != 0).all()), "kept weights keep training"
    params = layout.parameters(model)
    momentum = layout.flatten([optimizer.state[p]["momentum_buffer"] for p in params])
    assert bool((momentum[~result.masks.flat] == 0).all())
    assert session.close().sparsity == result.sparsity


def test_gradual_session_prunes_on_schedule():
    model = _model()
    pipe = Pipeline.from_config(_config(
        prune={"sparsity": 0.75, "loss_samples": 0},
        schedule={"name": "gradual", "start": 2, "end": 10, "frequency": 4,
                  "initial_sparsity": 0.1},
    ))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = _data(n=64)
    session = pipe.attach(model, optimizer, data=data)
    events = []
    for _ in range(4):
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            report = session.step()
            if report is not None:
                events.append((report.train_step, round(report.target_sparsity, 6)))
    result = session.close()
    assert [step for step, _ in events] == [2, 6, 10]
    assert events[-1][1] == 0.75
    assert abs(result.sparsity - 0.75) < 1e-3
    levels = [level for _, level in events]
    assert levels == sorted(levels)


def _train_once_then_prune(pipe, model, data):
    """One optimizer step with lr = 0 (weights unchanged), then the session's pruning event."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    session = pipe.attach(model, optimizer, data=data)
    x, y = next(iter(data))
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    session.before_optimizer_step()
    optimizer.step()
    session.step()
    return session.close()


@pytest.mark.parametrize("substeps", [1, 3])
def test_gradual_substeps_equal_successive_oneshot_prunes(substeps):
    # A single event (start = end = 0) to 0.8 in k sub-steps prunes exactly as the oneshot
    # schedule's k geometric steps: same levels, same gradients (seeded by the step index),
    # the dense float64 estimator, so the same masks and weights.
    data = _data()
    estimator = {"name": "dense", "block_size": 16, "damping": 1e-2, "num_grads": 16,
                 "dtype": "float64"}
    gradual = Pipeline.from_config(_config(
        estimator=estimator,
        schedule={"name": "gradual", "start": 0, "end": 0, "substeps": substeps},
    ))
    oneshot = Pipeline.from_config(_config(
        estimator=estimator, schedule={"name": "oneshot", "steps": substeps},
    ))
    during, after = _model(), _model()
    result = _train_once_then_prune(gradual, during, data)
    reference = oneshot.prune(after, data)
    assert len(result.steps) == len(reference.steps) == substeps
    assert [s.target_sparsity for s in result.steps] == [s.target_sparsity
                                                         for s in reference.steps]
    assert all(s.train_step == 0 for s in result.steps)
    assert [s.step for s in result.steps] == list(range(substeps))
    assert torch.equal(result.masks.flat, reference.masks.flat)
    layout = gradual.select(during)
    torch.testing.assert_close(layout.gather(during), layout.gather(after), rtol=0, atol=0)
    if substeps > 1:  # the recomputations matter: one step to 0.8 chooses other weights
        single = Pipeline.from_config(_config(estimator=estimator,
                                              schedule={"name": "oneshot", "steps": 1}))
        assert not torch.equal(single.prune(_model(), data).masks.flat, result.masks.flat)


def test_gradual_substeps_report_every_sub_step_of_every_event():
    pipe = Pipeline.from_config(_config(
        prune={"sparsity": 0.75, "loss_samples": 0},
        schedule={"name": "gradual", "start": 1, "end": 3, "frequency": 2,
                  "initial_sparsity": 0.3, "substeps": 4},
    ))
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = _data(n=64)
    session = pipe.attach(model, optimizer, data=data)
    returned = []
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        returned.append(session.step())
    result = session.close()
    assert len(result.steps) == 8
    assert [s.train_step for s in result.steps] == [1] * 4 + [3] * 4
    assert returned[1] is result.steps[3] and returned[3] is result.steps[7]
    assert returned[0] is None and returned[2] is None
    assert result.steps[3].target_sparsity == pytest.approx(0.3, abs=1e-12)
    assert result.steps[7].target_sparsity == 0.75
    sparsities = [s.sparsity for s in result.steps]
    assert sparsities == sorted(sparsities) and len(set(sparsities)) == 8


class _RecordingSGD(torch.optim.SGD):
    """SGD that implements the MaskAwareOptimizer protocol and records its calls."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.calls = []

    def apply_masks(self, masks):
        self.calls.append({id(p): m.clone() for p, m in masks.items()})


def test_session_tells_a_mask_aware_optimizer_after_every_pruning_step():
    pipe = Pipeline.from_config(_config(
        prune={"sparsity": 0.6, "loss_samples": 0}, estimator=None,
        scorer={"name": "magnitude"},
        schedule={"name": "gradual", "start": 0, "end": 2, "frequency": 2, "substeps": 2,
                  "initial_sparsity": 0.3},
    ))
    model = _model()
    head = model[1].weight  # a selected (masked) parameter the optimizer does not hold
    held = [p for p in model.parameters() if p is not head]
    optimizer = _RecordingSGD(held, lr=0.01)
    assert isinstance(optimizer, curvprune.MaskAwareOptimizer)
    session = pipe.attach(model, optimizer)
    assert optimizer.calls == []  # nothing pruned yet
    layout = pipe.select(model)
    for x, y in _data(n=48):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        session.before_optimizer_step()
        optimizer.step()
        calls_before = len(optimizer.calls)
        session.step()
        if session.iteration - 1 in (0, 2):
            assert len(optimizer.calls) == calls_before + 2  # once per sub-step
            last = optimizer.calls[-1]
            expected = dict(zip(layout.names, layout.unflatten(session.masks.flat), strict=True))
            named = dict(model.named_parameters())
            assert set(last) == {id(named[n]) for n in expected if named[n] is not head}
            for name, mask in expected.items():
                if named[name] is not head:
                    assert torch.equal(last[id(named[name])], mask)
        else:
            assert len(optimizer.calls) == calls_before
    assert len(optimizer.calls) == 4 == len(session.close().steps)


def test_session_state_round_trip():
    model = _model()
    pipe = Pipeline.from_config(_config(estimator=None, scorer={"name": "magnitude"},
                                        schedule={"name": "oneshot"}))
    result = pipe.prune(model, _data())
    session = pipe.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), masks=result.masks)
    session.step()
    state = session.state_dict()
    fresh = pipe.attach(_model(seed=1), torch.optim.SGD(model.parameters(), lr=0.1))
    fresh.load_state_dict(state)
    assert fresh.iteration == 1
    assert torch.equal(fresh.masks.flat, result.masks.flat)


def test_memory_plan_refuses_runs_that_do_not_fit():
    pipe = Pipeline.from_config(_config(estimator={"name": "dense", "damping": 1e-2},
                                        run={"memory_limit_gb": 0.001}))
    with pytest.raises(curvprune.MemoryPlanError, match=r"needs .* GiB .*estimator.*block_size"):
        pipe.prune(_model(), _data())


def test_attach_without_data_for_a_data_hungry_gradual_run_fails_at_once():
    pipe = Pipeline.from_config(_config(schedule={"name": "gradual", "start": 0, "end": 10,
                                                  "frequency": 5}))
    model = _model()
    with pytest.raises(ConfigError, match="pass data=<DataLoader> to attach"):
        pipe.attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
