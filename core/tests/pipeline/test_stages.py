"""Sequential calibration: stage planning, cached block inputs, the prefix forward, validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from curvprune import ConfigError, Pipeline, select_parameters
from curvprune.pipeline.stages import SequentialCalibration, plan_stages

F64 = torch.float64


class Block(nn.Module):
    """A residual block that needs a keyword argument, like a transformer block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, hidden, gate=None, *, scale):
        out = self.down(torch.tanh(self.up(hidden))) * scale
        return (hidden + (out if gate is None else gate * out),)


class Toy(nn.Module):
    def __init__(self, width: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        hidden = self.stem(x)
        for i, block in enumerate(self.blocks):
            (hidden,) = block(hidden, torch.full((), 0.5) if i % 2 else None, scale=1.0 + i)
        return self.head(hidden)


def _toy() -> Toy:
    torch.manual_seed(0)
    return Toy().double().eval()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=F64)
    return [(x[:4], torch.zeros(4)), (x[4:], torch.zeros(6))]


def test_plan_puts_blocks_in_one_stage_each_and_other_layers_alone():
    model = _toy()
    plan = plan_stages(model, select_parameters(model), "block")
    assert plan.blocks == "blocks" and plan.n_blocks == 3
    assert [s.label for s in plan.stages] == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    assert [s.block for s in plan.stages] == [None, 0, 1, 2, None]
    assert plan.stages[1].modules == ("blocks.0.up", "blocks.0.down")
    by_layer = plan_stages(model, select_parameters(model), "layer")
    assert by_layer.blocks is None and len(by_layer.stages) == 8
    assert all(s.block is None for s in by_layer.stages)


def test_a_parameter_of_the_model_itself_is_refused():
    model = nn.Module()
    model.weight = nn.Parameter(torch.ones(2, 2))
    layout = select_parameters(nn.Sequential(nn.Linear(2, 2)))
    layout = type(layout)(("weight",), layout.shapes, layout.module_types)
    with pytest.raises(ConfigError, match="parameter of the model itself"):
        plan_stages(model, layout)


def _inputs_of(model: nn.Module, module: nn.Module, data) -> torch.Tensor:
    seen = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    return torch.cat(seen)


def test_cached_inputs_follow_the_pruned_blocks_and_names_resolve():
    """Each block's stage sees exactly what the block receives in a full forward of the model
    with the earlier stages already changed, and its model resolves the real names."""
    model, data = _toy(), _data()
    plan = plan_stages(model, select_parameters(model), "block")
    calibration = SequentialCalibration(model, plan, data, 10, torch.device("cpu"))
    for stage in plan.stages:
        stage_model, batches = calibration.enter(stage)
        names = dict(stage_model.named_modules())
        for path in stage.modules:
            assert names[path] is model.get_submodule(path)
        target = model.get_submodule(stage.modules[0])
        expected = _inputs_of(model, target, data)
        recorded = []
        handle = target.register_forward_pre_hook(lambda _, args: recorded.append(args[0]))
        with torch.no_grad():
            for x, _ in batches():
                stage_model(x)
        handle.remove()
        torch.testing.assert_close(torch.cat(recorded), expected, rtol=0, atol=0)
        with torch.no_grad():  # "prune" the stage: later stages must see the change
            for path in stage.modules:
                model.get_submodule(path).weight.mul_(0.5)
        calibration.leave(stage)


def test_batches_cut_at_num_samples_with_the_right_extras():
    model, data = _toy(), _data()
    plan = plan_stages(model, select_parameters(model), "block")
    calibration = SequentialCalibration(model, plan, data, 10, torch.device("cpu"))
    calibration.enter(plan.stages[0])
    calibration.leave(plan.stages[0])
    stage_model, batches = calibration.enter(plan.stages[1])
    xs = [x for x, _ in batches(num_samples=7)]
    assert [x.shape[0] for x in xs] == [4, 3]
    full = [x for x, _ in batches()]
    with torch.no_grad():
        torch.testing.assert_close(stage_model(xs[1])[0], stage_model(full[1])[0][:3])


def test_prefix_stage_stops_after_its_layer():
    model, data = _toy(), _data()
    plan = plan_stages(model, select_parameters(model), "layer")
    calibration = SequentialCalibration(model, plan, data, 10, torch.device("cpu"))
    stem = plan.stages[0]
    stage_model, batches = calibration.enter(stem)
    ran = []
    handle = model.head.register_forward_hook(lambda *_: ran.append(True))
    for x, _ in batches():
        assert stage_model(x) is None
    handle.remove()
    assert not ran


def _config(**schedule) -> dict:
    return {
        "scorer": {"name": "magnitude"},
        "schedule": {"name": "oneshot", **schedule},
        "mask": {"name": "layerwise"},
        "prune": {"sparsity": 0.5, "loss_samples": 0},
    }


def test_auto_calibration_is_dense_without_a_layer_wise_estimator():
    pipeline = Pipeline.from_config(_config())
    assert pipeline.schedule.staged_calibration(pipeline.components) is None
    staged = Pipeline.from_config(_config(calibration="sequential", stages="layer"))
    assert staged.schedule.staged_calibration(staged.components).stages == "layer"


@pytest.mark.parametrize("data", [_data, lambda: None])
def test_sequential_magnitude_equals_dense_magnitude(data):
    """Magnitude does not look at inputs: stage by stage (with or without data) it must prune
    exactly alike."""
    a, b = _toy(), _toy()
    Pipeline.from_config(_config()).prune(a, _data())
    result = Pipeline.from_config(_config(calibration="sequential")).prune(b, data())
    layout = select_parameters(a)
    assert torch.equal(layout.gather(a), layout.gather(b))
    assert result.steps[0].sparsity == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mask": {"name": "global"}}, "must decide each layer on its own"),
        ({"prune": {"sparsity": 0.5, "audit_single": 4}}, "single-weight audit"),
    ],
)
def test_sequential_refuses_what_needs_the_whole_model(changes, message):
    config = {**_config(calibration="sequential"), **changes}
    with pytest.raises(ConfigError, match=message):
        Pipeline.from_config(config)


def test_sequential_schedule_is_oneshot_with_sequential_calibration():
    pipeline = Pipeline.from_config({**_config(), "schedule": {"name": "sequential"}})
    assert pipeline.schedule.staged_calibration(pipeline.components) is not None
    with pytest.raises(ConfigError, match="calibration"):
        Pipeline.from_config(
            {**_config(), "schedule": {"name": "sequential", "calibration": "dense"}}
        )


def test_peeking_a_shuffled_loader_leaves_its_order_unchanged():
    from torch.utils.data import DataLoader, TensorDataset

    from curvprune.pipeline.pipeline import peek_batch

    data = TensorDataset(torch.arange(20.0), torch.zeros(20))
    loader = DataLoader(data, batch_size=5, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    first = peek_batch(loader)
    again = [x for x, _ in loader]
    assert torch.equal(first[0], again[0])  # the peeked batch is the run's first batch
    assert peek_batch(iter(loader)) is None  # a one-pass iterator is never consumed
    unshuffled = DataLoader(data, batch_size=5, shuffle=True)  # torch's global generator
    state = torch.get_rng_state()
    peek_batch(unshuffled)
    assert torch.equal(torch.get_rng_state(), state)
