"""Structure coverage (issue 18): depthwise and grouped convolutions, channel concatenation and
chunks, squeeze-and-excitation products, on hand-built modules and on the torchvision models
that need them.

Ground truths: the group facts of the small modules are written out by hand (which modules
produce, normalise, read each group, at which channel offset); for behaviour, the masked model
(structure weights, biases, BN γ, β zeroed through :class:`curvprune.MaskSet`) in float64 is the
reference, and the physically smaller model and the gated model must compute the same function.
Removal only drops exact zeros from sums, so the small models agree to 1e-12 of the output
scale; the torchvision models to 1e-6 (ReLU6 saturation and BatchNorms with small running
variances amplify float64 round-off: running the same model channels-last differs by ~2e-7).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import (
    StructureGraph,
    apply_removal,
    remove_structures,
)
from curvprune.testing.nets import (
    CatNet,
    ChunkNet,
    DenseCatNet,
    GroupedNet,
    InvertedResidualNet,
    SqueezeExciteNet,
    randomize_,
)
from curvprune.testing.removal import masked_copy, rescue, structured


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return float((a.detach() - b.detach()).abs().max()) <= rel * scale


def check_equivalence(model: nn.Module, keep: torch.Tensor, layout, x: torch.Tensor,
                      rel: float) -> nn.Module:
    """masked == gated == removed; returns the removed model."""
    with torch.no_grad():
        masked = masked_copy(model, layout, keep)
        expected = masked(x)
        with layout.structures.gates(model, keep.double()):
            gated = model(x)
        assert close(gated, expected, rel), "a zero gate differs from the masked structure"
        remove_structures(masked, layout.structures, keep)
        out = masked(x)
    assert out.shape == expected.shape
    assert close(out, expected, rel), "the removed model differs from the masked one"
    return masked


# --------------------------------------------------------------------------------------------
# Hand-built modules: the groups
# --------------------------------------------------------------------------------------------
def test_depthwise_convs_join_their_input_group():
    graph = StructureGraph.trace(InvertedResidualNet(c=4, expand=3))
    expanded = graph.group("expand.0")
    assert expanded.removable and expanded.size == 12 and expanded.producers == ("expand.0",)
    assert expanded.depthwise == ("dw.0", "dw2")
    assert expanded.norms == ("expand.1", "dw.1")
    assert expanded.consumers == (("project.0", 1),)
    # the expanded map feeds two depthwise convs: the gate stays after expand.1, and each
    # depthwise conv (its BN when it has one) is a gate point of its own
    assert expanded.gates == ("expand.1", "dw.1", "dw2")
    stream = graph.group("stem.0")
    assert stream.producers == ("stem.0", "project.0") and stream.coupled


def test_grouped_convs_keep_their_conv_groups_equal():
    graph = StructureGraph.trace(GroupedNet(c=4, width=8, groups=2))
    a, b = graph.group("a.0"), graph.group("b.0")
    assert (a.size, a.copies, a.channels) == (4, 2, 8) and a.consumers == (("b.0", 1),)
    assert (b.size, b.copies) == (4, 2) and b.consumers == (("c.0", 1),)
    assert a.channel_index([0, 3]).tolist() == [0, 3, 4, 7]  # slot s of every conv group
    lcm = StructureGraph.trace(nn.Sequential(
        nn.Conv2d(3, 12, 1), nn.Conv2d(12, 12, 3, groups=2), nn.Conv2d(12, 12, 3, groups=3),
        nn.Flatten(), nn.LazyLinear(2)))
    assert lcm.group("1").copies == 6 and lcm.group("1").size == 2  # lcm(2, 3) slots


def test_cat_puts_each_group_at_its_offset():
    graph = StructureGraph.trace(CatNet(c=4))
    a, b = graph.group("a"), graph.group("b")
    assert a.spans("consumers") == [(("mix", 1), 0)] and b.spans("consumers") == [(("mix", 1), 4)]
    dense = StructureGraph.trace(DenseCatNet(stem=4, growth=3, layers=2))
    stem, first, second = dense.group("stem"), dense.group("convs.0"), dense.group("convs.1")
    assert stem.spans("norms") == [("norms.0", 0), ("norms.1", 0), ("norm", 0)]
    assert first.spans("norms") == [("norms.1", 4), ("norm", 4)]
    assert first.spans("consumers") == [(("convs.1", 1), 4), (("fc", 4), 4)]
    assert second.spans("consumers") == [(("fc", 4), 7)]
    # pre-activation: every BN after a concatenation is a gate point at the group's offset
    assert first.spans("gates") == [("convs.0", 0), ("norms.1", 4), ("norm", 4)]
    assert dense.widths["norm"] == 10
    assert all(g.removable for g in dense.groups if g.name != "fc")


def test_chunks_hand_each_reader_a_window_and_keep_the_chunks_equal():
    graph = StructureGraph.trace(ChunkNet(c=4))
    a = graph.group("a.0")
    assert a.removable and (a.size, a.copies, a.channels) == (4, 2, 8)
    # chunk 0 (channels 0-3) goes straight into the cat at offset 0, chunk 1 (4-7) into pw1
    assert a.placed("consumers") == [(("pw1", 1), 0, 4, 8), (("mix", 1), 0, 0, 4)]
    assert a.channel_index([1]).tolist() == [1, 5]  # one slot of each chunk
    assert graph.group("pw1").depthwise == ("dw.0",)
    assert graph.group("pw2").placed("consumers") == [(("mix", 1), 4, 0, 4)]

    class Uneven(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(torch.chunk(self.conv(x), 3, dim=1)[0].mean((2, 3)))

    reason = StructureGraph.trace(Uneven()).group("conv").reason
    assert "chunk at node 'chunk' is not handled (only equal chunks of the channel dim)" in reason


def test_squeeze_excitation_product_couples_the_scale_with_the_map():
    graph = StructureGraph.trace(SqueezeExciteNet(c=6, squeeze=2))
    g = graph.group("conv.0")
    assert g.removable and g.producers == ("conv.0", "fc2")
    assert set(g.consumers) == {("fc1", 1), ("project", 1)}
    assert graph.group("fc1").removable  # the squeeze channels are a group of their own


class _Refused(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.how == "cat-height":
            y = torch.cat([a, b], 2).mean((2, 3))
            return self.fc(torch.cat([y, y], 1))
        if self.how == "cat-grouped":
            y = self.g(torch.cat([a, b], 1))
        elif self.how == "two-scales":
            y = torch.cat([torch.sigmoid(a) * torch.sigmoid(b), b], 1)
        else:
            y = torch.cat([torch.sigmoid(a), b], 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("how", "reason"), [
    ("cat-height", "cat at node 'cat' along dim 2, not the channel dim"),
    ("cat-grouped", "grouped convolution 'g' reads a concatenation"),
    ("two-scales", "mul at node 'mul' multiplies two scales"),
    ("sigmoid-cat", "sigmoid at node 'sigmoid' maps a zero channel to a nonzero value"),
])
def test_what_stays_unsupported_is_refused_with_the_node_named(how, reason):
    graph = StructureGraph.trace(_Refused(how))
    assert not graph.group("a").removable and reason in graph.group("a").reason


class _TwoHeads(nn.Module):
    """Returns a namedtuple (like GoogLeNet and Inception with auxiliary heads in training)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.main, self.aux = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        from collections import namedtuple

        h = self.conv(x).mean((2, 3))
        return namedtuple("Outputs", ["logits", "aux"])(self.main(h), self.aux(h))


def test_norms_mixing_channels_keep_whole_groups_or_are_refused_with_why():
    # GroupNorm: whole groups (test_shapes.py); LayerNorm over the features: renormalised
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.LazyLinear(2))
    assert StructureGraph.trace(model).group("0").block == 2
    mlp = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    assert StructureGraph.trace(mlp).group("0").renorms == ("1",)
    lrn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LocalResponseNorm(2), nn.Flatten(),
                        nn.LazyLinear(2))
    assert StructureGraph.trace(lrn).group("0").reason == (
        "LocalResponseNorm '1' normalises across the channels (removing one changes the "
        "others' statistics)")


def test_heads_returned_in_a_namedtuple_reach_the_model_output():
    graph = StructureGraph.trace(_TwoHeads())
    assert graph.group("conv").removable
    for head in ("main", "aux"):
        assert graph.group(head).reason == "its channels reach the model output"


# --------------------------------------------------------------------------------------------
# Hand-built modules: masked == gated == removed
# --------------------------------------------------------------------------------------------
NETS = {
    "inverted-residual": (lambda: InvertedResidualNet(c=4, expand=3), (3, 3, 6, 6)),
    "grouped": (lambda: GroupedNet(c=4, width=12, groups=3), (3, 3, 6, 6)),
    "cat": (lambda: CatNet(c=4), (3, 3, 6, 6)),
    "chunk": (lambda: ChunkNet(c=4), (3, 3, 6, 6)),
    "dense-cat": (lambda: DenseCatNet(stem=4, growth=3, layers=3), (3, 3, 8, 8)),
    "squeeze-excite": (lambda: SqueezeExciteNet(c=6, squeeze=3), (3, 3, 6, 6)),
}


@pytest.mark.parametrize("name", sorted(NETS))
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_removed_equals_masked_on_hand_built_modules(name, data):
    build, shape = NETS[name]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(build().double(), gen).eval()
    layout = structured(model)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=layout.n_structures,
                                           max_size=layout.n_structures), label="keep"))
    keep = rescue(keep, layout)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    removed = check_equivalence(model, keep, layout, x, 1e-12)
    # every producer and depthwise conv has kept x copies channels
    modules = dict(removed.named_modules())
    for i, g in enumerate(layout.structures.groups):
        kept = int(keep[layout.structures.group_slice(i)].sum()) * g.copies
        assert {modules[m].out_channels for m in g.producers + g.depthwise} == {kept}
    StructureGraph.trace(removed)  # and it still traces
    # the record rebuilds the same architecture on a fresh model: the state dict loads
    kept = {g.name: keep[layout.structures.group_slice(i)].nonzero().squeeze(1).tolist()
            for i, g in enumerate(layout.structures.groups)}
    fresh = build().double()
    apply_removal(fresh, kept)
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert close(fresh.eval()(x), removed(x), 1e-12)


def test_removal_slices_depthwise_and_grouped_convs():
    model = randomize_(InvertedResidualNet(c=4, expand=3).double(), torch.Generator()).eval()
    layout = structured(model)
    index = [i for i, g in enumerate(layout.structures.groups) if g.name == "expand.0"][0]
    keep = torch.ones(layout.n_structures, dtype=torch.bool)
    keep[layout.structures.group_slice(index)] = torch.arange(12) % 3 != 0  # keep 8 of 12
    result = remove_structures(model, layout.structures, keep)
    for dw in (model.dw[0], model.dw2):
        assert dw.in_channels == dw.out_channels == dw.groups == 8
        assert dw.weight.shape == (8, 1, 3, 3)
    assert model.dw2.bias.shape == (8,) and model.project[0].in_channels == 8
    fresh = InvertedResidualNet(c=4, expand=3).double()
    apply_removal(fresh, result.kept_indices)
    fresh.load_state_dict(model.state_dict())  # same architecture, rebuilt from the record

    grouped = randomize_(GroupedNet(c=4, width=12, groups=3).double(), torch.Generator()).eval()
    layout = structured(grouped)
    keep = torch.ones(layout.n_structures, dtype=torch.bool)
    index = [i for i, g in enumerate(layout.structures.groups) if g.name == "a.0"][0]
    keep[layout.structures.group_slice(index)] = torch.tensor([True, False, True, False])
    remove_structures(grouped, layout.structures, keep)
    conv = grouped.b[0]
    assert conv.groups == 3 and conv.in_channels == 6 and conv.weight.shape == (12, 2, 3, 3)
    assert grouped.a[0].out_channels == 6


# --------------------------------------------------------------------------------------------
# torchvision models
# --------------------------------------------------------------------------------------------
torchvision = pytest.importorskip("torchvision")

_FAST = ["mobilenet_v2", "mobilenet_v3_small"]
_SLOW = ["efficientnet_b0", "regnet_x_400mf", "densenet121", "googlenet"]


def _torchvision(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, **kwargs)


@pytest.mark.parametrize(
    "name", _FAST + [pytest.param(n, marks=pytest.mark.slow) for n in _SLOW])
def test_torchvision_models_prune_every_group_but_the_classifier(name):
    model = randomize_(_torchvision(name).double(), torch.Generator().manual_seed(0)).eval()
    graph = StructureGraph.trace(model)
    refused = [g.name for g in graph.groups if not g.removable]
    assert len(refused) == 1 and "reach the model output" in graph.group(refused[0]).reason
    layout = structured(model)
    keep = rescue(torch.rand(layout.n_structures, generator=torch.Generator().manual_seed(1))
                  > 0.3, layout)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    removed = check_equivalence(model, keep, layout, x, 1e-6)
    assert removed(x).shape == (1, 1000)
    if name in ("mobilenet_v2", "efficientnet_b0"):  # the expanded channels are pruned
        expanded = [g for g in layout.structures.groups if g.depthwise]
        assert len(expanded) >= 16
