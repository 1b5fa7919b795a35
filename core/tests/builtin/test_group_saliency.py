"""Group saliencies: a channel structure's magnitude sums over every parameter its removal deletes.

Two independent ground truths:

* by hand, on a small conv net with a residual add and BatchNorms, and on a Linear MLP, with
  one constant value per parameter tensor, so each score is (entries deleted) × (value), counted
  from the architecture;
* by physically removing one structure (:func:`curvprune.remove_structures`) from a copy of a
  random model and diffing its parameters: removal only deletes entries, so the L1 score is what
  Σ|θ| over all parameters drops by, the squared L2 score what Σθ² drops by, and the count what
  the number of parameters drops by. This runs on every tracer pattern (residual streams,
  flatten, concatenation, depthwise, grouped, chunk, squeeze-and-excitation); the LayerNorm,
  layer-scale, GroupNorm, shuffle, attention and ViT patterns are in
  ``test_group_sums_coverage.py``.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvprune
from curvprune import PruneContext, StructureGraph, select_parameters
from curvprune.builtin.group_saliency import group_sums
from curvprune.run.models import DigitsCNN
from curvprune.testing.nets import (
    CatNet,
    ChunkNet,
    DenseCatNet,
    GroupedNet,
    InvertedResidualNet,
    SqueezeExciteNet,
    TinyResNet,
    randomize_,
    sequential_cnn,
)
from curvprune.testing.removal import assert_group_sums_match_removal

HOST = curvprune.get_plugin_manager(autoload=False)


def structured(model: nn.Module):
    layout = select_parameters(model)
    return layout.with_structures(StructureGraph.trace(model).structures(layout))


class HandNet(nn.Module):
    """stem conv (1→2) + BN, an internal conv (2→3, bias) + BN, a 1×1 projection (3→2) + BN
    added back to the stem's output, flatten of the 2×4×4 map into a Linear(32, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(2)
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(3)
        self.proj = nn.Conv2d(3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv(a)))
        y = F.relu(self.bn2(self.proj(h)) + a)
        return self.fc(torch.flatten(y, 1))


#: one value per parameter tensor of HandNet
HAND_VALUES = {"stem.weight": 1.0, "bn0.weight": 0.5, "bn0.bias": -0.25, "conv.weight": 2.0,
               "conv.bias": -3.0, "bn1.weight": 4.0, "bn1.bias": 0.125, "proj.weight": -1.5,
               "bn2.weight": 0.75, "bn2.bias": 6.0, "fc.weight": 0.1, "fc.bias": 7.0}


def _fill(model: nn.Module, values: dict[str, float]) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(values[name])
    return model


def _scores(model: nn.Module, layout, **options) -> torch.Tensor:
    ctx = PruneContext(model=model, layout=layout, weights=layout.gather(model),
                       mask=torch.ones(layout.d, dtype=torch.bool), target_sparsity=0.5)
    return curvprune.create("scorer", "magnitude", host=HOST, granularity="channel",
                            normalize="none", **options).score(ctx)


def test_hand_computed_residual_conv_net():
    model = _fill(HandNet(), HAND_VALUES).eval()
    layout = structured(model)
    groups = layout.structures.groups
    assert [g.name for g in groups] == ["stem", "conv"]
    assert set(groups[0].producers) == {"stem", "proj"} and groups[0].coupled
    v = {k: abs(x) for k, x in HAND_VALUES.items()}
    # stream channel c: stem row (1·3·3), proj row (3·1·1), bn0 and bn2 γ, β, the conv's input
    # column c (3 rows · 3·3) and the fc's 16 columns of channel c (5 rows · 16)
    stream = (9 * v["stem.weight"] + 3 * v["proj.weight"] + v["bn0.weight"] + v["bn0.bias"]
              + v["bn2.weight"] + v["bn2.bias"] + 27 * v["conv.weight"] + 80 * v["fc.weight"])
    # internal channel c: conv row (2·3·3) and bias, bn1 γ, β, the proj's input column (2 rows)
    internal = (18 * v["conv.weight"] + v["conv.bias"] + v["bn1.weight"] + v["bn1.bias"]
                + 2 * v["proj.weight"])
    l1 = _scores(model, layout, norm="l1")
    torch.testing.assert_close(l1, torch.tensor([stream] * 2 + [internal] * 3))
    sq = {k: x * x for k, x in HAND_VALUES.items()}
    stream2 = (9 * sq["stem.weight"] + 3 * sq["proj.weight"] + sq["bn0.weight"] + sq["bn0.bias"]
               + sq["bn2.weight"] + sq["bn2.bias"] + 27 * sq["conv.weight"] + 80 * sq["fc.weight"])
    internal2 = (18 * sq["conv.weight"] + sq["conv.bias"] + sq["bn1.weight"] + sq["bn1.bias"]
                 + 2 * sq["proj.weight"])
    l2 = _scores(model, layout, norm="l2")
    expected = torch.tensor([math.sqrt(stream2)] * 2 + [math.sqrt(internal2)] * 3)
    torch.testing.assert_close(l2, expected)
    # the filter-only extent: the producers' weight rows
    rows = _scores(model, layout, norm="l1", extent="producers")
    torch.testing.assert_close(rows, torch.tensor([9 * 1.0 + 3 * 1.5] * 2 + [18 * 2.0] * 3))


def test_hand_computed_linear_mlp():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 5))
    values = {"0.weight": 1.0, "0.bias": -2.0, "2.weight": 0.5, "2.bias": 3.0,
              "4.weight": -0.25, "4.bias": 9.0}
    _fill(model, values)
    layout = structured(model)
    # unit of layer 0: its row (4) and bias, layer 2's column (2 rows)
    # unit of layer 2: its row (3) and bias, layer 4's column (5 rows)
    l1 = _scores(model, layout, norm="l1")
    expected = [4 + 2 + 2 * 0.5] * 3 + [3 * 0.5 + 3 + 5 * 0.25] * 2
    torch.testing.assert_close(l1, torch.tensor(expected))
    rows = _scores(model, layout, norm="l1", extent="producers")
    torch.testing.assert_close(rows, torch.tensor([4.0] * 3 + [1.5] * 2))


MODELS = {
    "resnet-basic": lambda: TinyResNet("basic", widths=(2, 3), blocks=2, stem=2),
    "resnet-bottleneck": lambda: TinyResNet("bottleneck", widths=(2,), blocks=2, stem=3),
    "mlp": lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                                 nn.Linear(4, 3)),
    "cnn-flatten": lambda: sequential_cnn([3, 2], hidden=[4], pool=True),
    "digits-cnn": lambda: DigitsCNN(width=2),
    "cat": lambda: CatNet(3),
    "dense-cat": lambda: DenseCatNet(stem=3, growth=2, layers=2),
    "depthwise": lambda: InvertedResidualNet(c=2, expand=2),
    "grouped": lambda: GroupedNet(c=4, width=4, groups=2),
    "chunk": lambda: ChunkNet(4),
    "squeeze-excite": lambda: SqueezeExciteNet(c=4, squeeze=2),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_sums_equal_what_physical_removal_deletes(name):
    """L1, squared L2 and count of each structure = the drop of Σ|θ|, Σθ² and #θ when that
    structure alone is physically removed, with and without structures already removed."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = randomize_(MODELS[name]().double(), gen).eval()
    layout = structured(model)
    S = layout.n_structures
    assert S > 0
    structures = layout.structures
    group = layout.structure_group()
    keep = torch.ones(S, dtype=torch.bool)
    # an earlier step removed the first structure of every group with two or more
    for g in range(structures.n_groups):
        if int((group == g).sum()) > 1:
            keep[structures.offsets[g]] = False
    for keep_before in (torch.ones(S, dtype=torch.bool), keep):
        assert_group_sums_match_removal(model, layout, keep_before)


def test_group_sums_need_traced_structures():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    layout = select_parameters(model)
    with pytest.raises(ValueError, match="traced structures"):
        group_sums(model, layout, layout.gather(model), torch.ones(layout.d, dtype=torch.bool),
                   torch.abs)


def test_mean_normalization_of_group_sums_is_relative_to_the_group():
    """``normalize = "mean"`` divides each group-summed norm by its group's mean over kept
    structures: scaling one group's parameters (all its producers, norms and consumers' columns
    alike) leaves every normalised score unchanged."""
    gen = torch.Generator().manual_seed(3)
    model = randomize_(sequential_cnn([3, 4], hidden=[5], pool=True).double(), gen).eval()
    layout = structured(model)
    ctx = PruneContext(model=model, layout=layout, weights=layout.gather(model),
                       mask=torch.ones(layout.d, dtype=torch.bool), target_sparsity=0.5)
    scorer = curvprune.create("scorer", "magnitude", host=HOST, granularity="channel", norm="l1")
    raw = curvprune.create("scorer", "magnitude", host=HOST, granularity="channel", norm="l1",
                           normalize="none").score(ctx)
    scores = scorer.score(ctx)
    group = layout.structure_group()
    for g in range(layout.n_structure_groups):
        members = group == g
        torch.testing.assert_close(scores[members], raw[members] / raw[members].mean())
    # the last group (the Linear's 5 units) holds its rows, biases and the classifier's
    # columns; scaling all of them by 10 scales its raw sums by 10, not its normalised scores
    with torch.no_grad():
        model[-3].weight.mul_(10)
        model[-3].bias.mul_(10)
        model[-1].weight.mul_(10)
    ctx.weights = layout.gather(model)
    last = group == layout.n_structure_groups - 1
    assert int(last.sum()) == 5
    torch.testing.assert_close(scorer.score(ctx)[last], scores[last])


def test_layernorm_over_the_channels_is_counted_without_a_fallback():
    """A LayerNorm over a group's channels (``renorms``) loses γ_c and β_c with unit c: one
    value per tensor, unit c of layer 0 scores its row (4), bias, γ, β and layer 3's column
    (5 rows), with no warning (it used to fall back to the producers' rows)."""
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 5),
                          nn.ReLU(), nn.Linear(5, 3))
    values = {"0.weight": 1.0, "0.bias": -2.0, "1.weight": 0.5, "1.bias": 0.25,
              "3.weight": -3.0, "3.bias": 4.0, "5.weight": 0.125, "5.bias": 9.0}
    _fill(model, values)
    layout = structured(model)
    assert layout.structures.groups[0].renorms == ("1",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        l1 = _scores(model, layout, norm="l1")
    # unit of layer 3: its row (6) and bias, the classifier's column (3 rows)
    expected = [4 + 2 + 0.5 + 0.25 + 5 * 3] * 6 + [6 * 3 + 4 + 3 * 0.125] * 5
    torch.testing.assert_close(l1, torch.tensor(expected))
