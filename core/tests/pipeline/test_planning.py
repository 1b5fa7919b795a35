"""The plan's time: flops at this machine's measured matrix-multiply rate, and its classes."""

import math

import attrs
import pytest
import torch

from curvprune import Pipeline
from curvprune.pipeline.planning import measured_flops_per_second
from curvprune.run.models import DigitsMLP


def test_the_measured_rate_is_a_plausible_cpu_gemm_rate_and_cached():
    rate = measured_flops_per_second(torch.device("cpu"))
    assert 1e8 < rate < 1e14  # between a very slow core and a large server
    assert measured_flops_per_second(torch.device("cpu")) == rate  # measured once


def test_plan_seconds_are_flops_over_the_rate_and_name_their_class():
    pipeline = Pipeline.from_config({
        "estimator": {"name": "dense", "block_size": 16, "num_grads": 8},
        "scorer": {"name": "obs"},
    })
    plan = pipeline.plan(DigitsMLP(), device="cpu")
    assert plan.flops is not None and plan.flops_per_second is not None
    assert math.isclose(plan.seconds, plan.flops / plan.flops_per_second)
    for seconds, name in ((1.0, "seconds"), (600.0, "minutes"), (7200.0, "hours")):
        fake = attrs.evolve(plan, flops=seconds * plan.flops_per_second)
        assert fake.time_class == name
    record = plan.to_dict()
    assert record["seconds"] == pytest.approx(plan.seconds)
    assert record["time_class"] == plan.time_class


def test_without_a_flop_estimate_the_time_is_unknown():
    plan = Pipeline.from_config({"scorer": {"name": "magnitude"}}).plan(DigitsMLP(), device="cpu")
    assert plan.flops is None and plan.seconds is None and plan.time_class == "unknown"


def test_default_fit_passes_make_no_grad_and_change_nothing():
    pipeline = Pipeline.from_config({"estimator": {"name": "dense", "block_size": 8},
                                     "scorer": {"name": "obs"}})
    model = DigitsMLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = pipeline.select(model)
    batch = (torch.randn(4, 64), torch.tensor([0, 1, 2, 3]))
    pipeline.estimator.fit_passes(model, batch, torch.nn.functional.cross_entropy, layout)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("num_grads, held", [(16, False), (128, True)])
def test_a_model_fitted_estimator_is_probed_with_its_fit_passes(monkeypatch, num_grads, held):
    """The plan runs the estimator's own per-batch passes on at most ``num_grads`` samples of
    the example, with the given loss; the held state counts only when the fit spans batches."""
    pipeline = Pipeline.from_config({"estimator": {"name": "dense", "block_size": 8,
                                                   "num_grads": num_grads},
                                     "scorer": {"name": "obs"}})
    estimator, seen = pipeline.estimator, []

    def passes(model, batch, loss_fn, layout):
        seen.append((batch[0].shape[0], batch[1].shape[0], loss_fn))
        torch.ones(4096)  # some allocation to measure

    monkeypatch.setattr(type(estimator), "fits_model", True)
    monkeypatch.setattr(estimator, "fit_passes", passes)
    loss = torch.nn.functional.cross_entropy
    example = (torch.randn(32, 64), torch.randint(0, 10, (32,)))
    plan = pipeline.plan(DigitsMLP(), example=example, loss_fn=loss)
    assert seen == [(min(32, num_grads),) * 2 + (loss,)]
    assert plan.memory["activations"] > 0
    assert (plan.estimator_held > 0) is held


def test_the_activation_probe_covers_a_whole_chunk_of_mini_batches():
    """A chunk of C rows of fisher_mini_batch samples runs C·b samples through the model at
    once, whatever the data's batch size: a small example batch is repeated to that many
    (BERT with M-FAC's b = 32 was planned at 1.30 of its peak when the probe ran one batch)."""
    pipeline = Pipeline.from_config({
        "estimator": {"name": "dense", "block_size": 8, "num_grads": 16, "fisher_mini_batch": 8},
        "scorer": {"name": "obs"}, "prune": {"gradient_chunk": 4}})
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g)
    model = DigitsMLP()
    small = pipeline.plan(model, example=(x[:4], y[:4])).memory["activations"]
    whole = pipeline.plan(model, example=(x, y)).memory["activations"]
    per_sample = Pipeline.from_config({
        "estimator": {"name": "dense", "block_size": 8, "num_grads": 16, "fisher_mini_batch": 1},
        "scorer": {"name": "obs"}, "prune": {"gradient_chunk": 4}})
    four = per_sample.plan(model, example=(x, y)).memory["activations"]  # 4 samples a chunk
    assert small == whole > four > 0


def test_micro_batches_bound_the_probed_activations():
    """``[prune] gradient_micro_batch`` runs chunk × micro samples at a time: the plan probes
    exactly that many (here 4 × 2, as a mini-batch of 2 without micro-batches)."""
    def plan(mini_batch, micro=None):
        pipeline = Pipeline.from_config({
            "estimator": {"name": "dense", "block_size": 8, "num_grads": 16,
                          "fisher_mini_batch": mini_batch},
            "scorer": {"name": "obs"},
            "prune": {"gradient_chunk": 4, "gradient_micro_batch": micro}})
        g = torch.Generator().manual_seed(0)
        example = (torch.randn(32, 64, generator=g), torch.randint(0, 10, (32,), generator=g))
        return pipeline.plan(DigitsMLP(), example=example).memory["activations"]

    assert plan(8, micro=2) == plan(2) < plan(8)
