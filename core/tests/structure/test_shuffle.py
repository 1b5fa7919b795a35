"""Structure coverage (issue 18): channel shuffles (view-transpose-view, ``nn.ChannelShuffle``,
``F.channel_shuffle``) and chunks of shuffled or concatenated channels.

Ground truth: the masked model in float64 (structure weight rows, biases, BN γ, β zeroed); the
gated and the physically smaller model must compute the same function. Removal only drops
exact zeros from sums, so they agree to 1e-12 of the output scale. What the channel-group model
cannot express (ShuffleNetV2's later units) must be refused with the node named.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import (
    StructureGraph,
    apply_removal,
)
from curvprune.testing.nets import randomize_
from curvprune.testing.removal import check, structured


def view_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel_shuffle."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffledMap(nn.Module):
    """One conv's 6 channels shuffled in 3 groups (module, function or views), then BN,
    a depthwise conv and a 1×1 conv; a flatten into the classifier."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.shuffle = nn.ChannelShuffle(3)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(4 * 9, 5)

    def forward(self, x):
        y = self.conv(x)
        if self.how == "module":
            y = self.shuffle(y)
        elif self.how == "function":
            y = F.channel_shuffle(y, 3)
        else:
            y = view_shuffle(y, 3)
        y = self.pw(torch.relu(self.dw(torch.relu(self.bn(y)))))
        return self.fc(torch.flatten(torch.relu(y), 1))


class FirstUnit(nn.Module):
    """A ShuffleNetV2 stage's first unit (two branches concatenated, shuffled in 2), then the
    next unit's split: one half into a conv, the other through a BN into another conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, c, 3, padding=1)
        self.b = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c1, self.c2 = nn.Conv2d(c, 3, 1), nn.Conv2d(c, 3, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        y = view_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2)
        x1, x2 = y.chunk(2, dim=1)
        z = torch.cat([self.c1(x1), self.c2(torch.relu(self.bn(x2)))], 1)
        return self.fc(z.mean((2, 3)))


def test_a_shuffle_of_one_map_keeps_its_rows_equal_and_readers_see_strides():
    graph = StructureGraph.trace(ShuffledMap("module"))
    g = graph.group("conv")
    assert g.removable and (g.size, g.copies) == (2, 3)
    # row r (channels 2r, 2r + 1) lands at positions r, r + 3
    assert g.laid("norms") == [("bn", 0, 0, 2, 3), ("bn", 1, 2, 4, 3), ("bn", 2, 4, 6, 3)]
    assert [c for c, *_ in g.laid("consumers")] == [("pw", 1)] * 3
    for how in ("function", "views"):
        other = StructureGraph.trace(ShuffledMap(how)).group("conv")
        assert other.laid("norms") == g.laid("norms") and other.removable


def test_a_shuffle_of_a_concatenation_couples_its_rows():
    graph = StructureGraph.trace(FirstUnit())
    g = graph.group("a")
    assert g.removable and g.producers == ("a", "b") and g.copies == 2  # chunk halves equal
    # a and b interleave (a at even, b at odd places); the first half goes to c1
    assert set(g.laid("consumers")) == {(("c1", 1), 0, 0, 2, 2), (("c1", 1), 1, 0, 2, 2),
                                        (("c2", 1), 0, 2, 4, 2), (("c2", 1), 1, 2, 4, 2)}
    assert ("bn", 0, 2, 4, 2) in g.laid("norms")


NETS = {
    "module": (lambda: ShuffledMap("module"), (2, 3, 3, 3)),
    "function": (lambda: ShuffledMap("function"), (2, 3, 3, 3)),
    "views": (lambda: ShuffledMap("views"), (2, 3, 3, 3)),
    "first-unit": (FirstUnit, (2, 3, 5, 5)),
}


@pytest.mark.parametrize("name", sorted(NETS))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_removed_equals_masked_through_shuffles(name, data):
    build, shape = NETS[name]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(build().double(), gen).eval()
    n = structured(model).n_structures
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    removed, layout, plain_gap = check(model, keep, x)
    assert plain_gap <= 1e-12 and removed(x).shape == (2, 5)
    kept = {g.name: keep[layout.structures.group_slice(i)].nonzero().squeeze(1).tolist()
            for i, g in enumerate(layout.structures.groups)}
    fresh = build().double()
    apply_removal(fresh, kept)
    fresh.load_state_dict(removed.state_dict())


torchvision = pytest.importorskip("torchvision")


def test_shufflenet_v2_refuses_the_later_units_by_node_and_prunes_the_rest_exactly():
    model = randomize_(torchvision.models.shufflenet_v2_x0_5(weights=None).double(),
                       torch.Generator().manual_seed(0)).eval()
    graph = StructureGraph.trace(model)
    stream = graph.group("stage2.0.branch1.2")
    assert stream.producers == ("stage2.0.branch1.2", "stage2.0.branch2.5")  # the first unit
    assert stream.reason == (
        "view at node 'view_3' (a channel shuffle into 2 groups): its rows hold channels laid "
        "out differently, so no removal keeps its rows aligned")
    prunable = [g for g in graph.groups if g.removable]
    assert len(prunable) == 20 and all(g.name.endswith(".0") for g in prunable)
    layout = structured(model)
    keep = torch.rand(layout.n_structures, generator=torch.Generator().manual_seed(1)) > 0.3
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    removed, _, _ = check(model, keep, x)
    assert removed(x).shape == (1, 1000)


# --------------------------------------------------------------------------------------------
# Random compositions of the supported ops: never a crash, and removal stays exact
# --------------------------------------------------------------------------------------------
BLOCKS = ("bn", "channels-last", "layernorm2d", "groupnorm", "shuffle", "chunk-cat", "dw",
          "scale", "residual", "conv", "split")


class Composed(nn.Module):
    """A stem conv of 6 channels, then the named blocks in order, a mean and a classifier;
    traced into a GraphModule when a block splits at literal sizes."""

    def __init__(self, blocks: list[str], c: int = 6) -> None:
        from torchvision.models.convnext import LayerNorm2d

        super().__init__()
        self.blocks = list(blocks)
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.mods = nn.ModuleList()
        for kind in self.blocks:
            m = nn.Module()
            if kind == "bn":
                m.bn = nn.BatchNorm2d(c)
            elif kind == "channels-last":
                m.norm, m.fc = nn.LayerNorm(c), nn.Linear(c, c)
            elif kind == "layernorm2d":
                m.norm = LayerNorm2d(c)
            elif kind == "groupnorm":
                m.norm = nn.GroupNorm(3, c)
            elif kind == "shuffle":
                m.shuffle = nn.ChannelShuffle(2)
            elif kind == "chunk-cat":
                m.conv = nn.Conv2d(c // 2, c // 2, 1)
            elif kind == "dw":
                m.conv, m.bn = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c)
            elif kind == "scale":
                m.gamma = nn.Parameter(torch.ones(c, 1, 1))
            elif kind in ("residual", "conv"):
                m.conv = nn.Conv2d(c, c, 1)
            elif kind == "split":
                m.a, m.b = nn.Conv2d(2, 2, 1), nn.Conv2d(4, 4, 1)
            self.mods.append(m)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = self.stem(x)
        for kind, m in zip(self.blocks, self.mods):
            if kind == "bn":
                y = torch.relu(m.bn(y))
            elif kind == "channels-last":
                y = m.fc(m.norm(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
            elif kind in ("layernorm2d", "groupnorm"):
                y = m.norm(y)
            elif kind == "shuffle":
                y = m.shuffle(y)
            elif kind == "chunk-cat":
                a, b = y.chunk(2, dim=1)
                y = torch.cat([b, m.conv(torch.relu(a))], 1)
            elif kind == "dw":
                y = m.bn(m.conv(y))
            elif kind == "scale":
                y = m.gamma * y
            elif kind == "residual":
                y = y + m.conv(torch.relu(y))
            elif kind == "conv":
                y = m.conv(torch.relu(y))
            elif kind == "split":
                p, q = torch.split(y, [2, 4], dim=1)
                y = torch.cat([m.a(p), m.b(q)], 1)
        return self.head(y.mean((2, 3)))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_compositions_trace_without_crashing_and_remove_exactly(data):
    blocks = data.draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=4),
                       label="blocks")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(Composed(blocks).double(), gen).eval()
    if "split" in blocks:
        model = torch.fx.symbolic_trace(model)
    graph = StructureGraph.trace(model)  # never a crash: refusals are reasons
    for g in graph.groups:
        assert g.removable or (g.reason and "\n" not in g.reason)
    layout = structured(model)
    if layout.n_structures == 0:
        return
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=layout.n_structures,
                                           max_size=layout.n_structures), label="keep"))
    for i, g in enumerate(layout.structures.groups):  # a kept channel in every split piece
        for _, windows in g.splits:
            for lo, hi in windows:
                span = g.channel_index(torch.arange(g.size))
                inside = ((span >= lo) & (span < hi)).nonzero().squeeze(1)
                keep[layout.structures.group_slice(i).start + int(inside[0]) % g.size] = True
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    removed, _, _ = check(model, keep, x)
    assert removed(x).shape == (2, 5)
