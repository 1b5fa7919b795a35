"""``select_by = "group"``: GReg picks the filters whose removal deletes the least L1 mass.

Ground truth by physical removal: removing filter j of a layer (``curvprune.remove_structures``
on a copy) deletes exactly its row, bias, BatchNorm γ_j, β_j and the next layers' input columns;
the drop of Σ|θ| over all parameters is filter j's group score. The picked set must be the
n_p filters of lowest drop, which here differs from the reference's lowest mean |W_j|.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import curvprune
from curvprune_greg import GRegConfig, GRegSchedule


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 16, 3)).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
        # make the filter norms and the group sums disagree: large next-layer columns behind
        # the smallest filters of the first conv
        model[3].weight[:, :3] *= 20
    return model.eval()


def _removal_drops(model: nn.Module, layer: str) -> torch.Tensor:
    layout = curvprune.select_parameters(model)
    structures = curvprune.StructureGraph.trace(model).structures(layout)
    g = next(i for i, grp in enumerate(structures.groups) if layer in grp.producers)
    first, size = structures.offsets[g], structures.groups[g].size
    before = sum(float(p.detach().abs().sum()) for p in model.parameters())
    drops = []
    for c in range(size):
        keep = torch.ones(structures.n_structures, dtype=torch.bool)
        keep[first + c] = False
        smaller = copy.deepcopy(model)
        curvprune.remove_structures(smaller, structures, keep)
        drops.append(before - sum(float(p.detach().abs().sum()) for p in smaller.parameters()))
    return torch.tensor(drops, dtype=torch.float64)


def _lowest(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    n = scores.numel()
    picked = torch.zeros(n, dtype=torch.bool)
    picked[torch.argsort(scores, stable=True)[: min(math.ceil(ratio * n), n - 1)]] = True
    return picked


@pytest.mark.parametrize("variant", [1, 2])
def test_group_selection_picks_the_lowest_removal_mass(variant):
    model = _model()
    layout = curvprune.select_parameters(model)
    options = {"variant": variant, "select_by": "group", "update_reg_interval": 1,
               "reg_granularity_pick": 5e-3, "reg_upper_limit_pick": 1e-2}
    schedule = GRegSchedule(GRegConfig(**options))
    schedule.bind(model, layout, 0.5)
    if variant == 2:  # two uniform updates reach τ_pick, then the pick (weights unchanged)
        for step in range(2):
            schedule.before_optimizer_step(step, model, layout)
        for p in model.parameters():
            p.grad = None
    picked = schedule.pruned_groups()
    for layer in ("0", "3"):
        expected = _lowest(_removal_drops(model, layer), 0.5)
        assert torch.equal(picked[f"{layer}.weight"].cpu(), expected), layer
    # the reference's filter-only choice differs on the first conv
    filters = model[0].weight.detach().abs().reshape(6, -1).mean(1)
    assert not torch.equal(_lowest(filters, 0.5), picked["0.weight"].cpu())
    default = GRegSchedule(GRegConfig(variant=1))
    default.bind(model, layout, 0.5)
    assert torch.equal(default.pruned_groups()["0.weight"].cpu(), _lowest(filters, 0.5))


def test_group_selection_needs_filters():
    with pytest.raises(ValueError, match="select_by = 'group' needs granularity = 'filter'"):
        GRegConfig(granularity="channel", select_by="group")
