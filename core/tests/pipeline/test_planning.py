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
