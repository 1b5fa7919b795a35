"""The ``wanda`` scorer in the pipeline: exact scores, the entry point, the contract, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvprune
from curvprune import ConfigError, Pipeline, PruneContext, select_parameters
from curvprune.testing.contracts import SaliencyScorerContract
from curvprune_sparsegpt.scorer import WandaConfig, WandaScorer


class TestWandaContract(SaliencyScorerContract):
    name = "wanda"


class Conv1D(nn.Module):
    """transformers' Conv1D: ``y = x @ W + b`` with W stored ``[in, out]``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(n_out, dtype=torch.float64))

    def forward(self, x):
        return x @ self.weight + self.bias


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 5 * 5, 7), nn.ReLU(), Conv1D(7, 4),
    ).double()


def _batches(n: int = 10):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    return list(DataLoader(TensorDataset(x, y), batch_size=4))


def _context(model, layout, batches):
    def calibration(num_samples=None):
        return iter(batches)

    return PruneContext(model=model, layout=layout, weights=layout.gather(model),
                        mask=torch.ones(layout.d, dtype=torch.bool), target_sparsity=0.5,
                        batches=calibration, loss_fn=F.cross_entropy)


def test_scores_are_weight_magnitude_times_input_norm_per_layer():
    model, batches = _net(), _batches()
    layout = select_parameters(model, ["Conv2d", "Linear", "re:5\\.weight"])
    scores = WandaScorer().score(_context(model, layout, batches))
    x = torch.cat([b[0] for b in batches])
    # the inputs each layer sees, written out by hand
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)
    hidden = torch.relu(model[0](x)).flatten(1)
    top = torch.relu(model[3](hidden))
    expected = [
        model[0].weight.abs() * patches.norm(dim=0).reshape(2, 3, 3),  # [3, 2, 3, 3]
        model[3].weight.abs() * hidden.norm(dim=0),
        model[5].weight.abs() * top.norm(dim=0)[:, None],  # Conv1D: rows are inputs
    ]
    torch.testing.assert_close(scores, layout.flatten([e.detach() for e in expected]),
                               rtol=1e-12, atol=1e-12)


def test_a_layer_wanda_cannot_score_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    layout = select_parameters(model, ["Linear", "BatchNorm1d"])
    with pytest.raises(ConfigError, match=r"not 1\.weight \(BatchNorm1d\).*prune\.ignore"):
        WandaScorer().score(_context(model, layout, _batches()))


def test_the_entry_point_registers_wanda():
    component = curvprune.get_plugin_manager().registry.get("scorer", "wanda")
    assert component.distribution == "curvprune-sparsegpt"
    assert component.factory is WandaScorer and component.config is WandaConfig
    assert WandaConfig().num_samples == 128


@pytest.fixture(scope="module")
def digits():
    loaders = curvprune.testing.digits_loaders(64)
    torch.manual_seed(0)
    model = curvprune.testing.DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for x, y in loaders.train:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval(), loaders


@pytest.mark.parametrize(("mask", "check"), [
    ({"name": "layerwise"}, "layer"),
    ({"name": "nm", "n_m": "2:4"}, "nm"),
])
def test_wanda_prunes_through_the_pipeline_from_a_config(digits, mask, check):
    model, loaders = digits
    pruned = curvprune.testing.DigitsMLP()
    pruned.load_state_dict(model.state_dict())
    pipeline = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "wanda", "num_samples": 256},
        "mask": mask,
    })
    result = pipeline.prune(pruned, loaders.grad, loss_fn=F.cross_entropy)  # loss is unused
    assert result.steps[-1].sparsity == pytest.approx(0.5)
    for name, keep in result.masks.tensors().items():
        if check == "layer":
            assert keep.float().mean().item() == pytest.approx(0.5, abs=1 / keep.numel())
        else:
            groups = keep.reshape(-1, 4)
            assert bool((groups.sum(dim=1) == 2).all()), name
    assert result.steps[0].predicted_loss_change is None  # no quadratic model, no update


def test_wanda_refuses_a_channel_mask_before_any_compute():
    with pytest.raises(ConfigError, match="wanda scores single weights"):
        Pipeline.from_config({"scorer": {"name": "wanda"},
                              "mask": {"name": "channel"}})
