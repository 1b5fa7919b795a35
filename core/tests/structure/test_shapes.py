"""Structure coverage (issue 18), second part: permutes and channels-last blocks, LayerNorm,
GroupNorm, layer scales, flattens into a Linear, and the refusal of what is left.

Ground truths, all in float64:

* **Exact removals** (GroupNorm whole groups, layer scales, permutes, flattens): the masked
  model (structure weight rows, biases, norm γ, β zeroed through :class:`curvprune.MaskSet`)
  is the reference; the gated and the physically smaller model must compute the same
  function. Removal only drops exact zeros from sums, so they agree to 1e-12 of the output
  scale (float64 round-off of sums reordered by the smaller shapes, ~1e-15, with margin).
* **LayerNorm over the channels**: a masked channel is a zero that still counts in the
  LayerNorm's mean and variance, a removed one does not. The reference of the smaller model
  is the masked model with those LayerNorms' statistics over the kept channels only
  (:func:`curvprune.structure.norms.kept_statistics`, the channels truly absent), to the same
  1e-12; the plain masked model is shown to differ (by far more than round-off).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import (
    ConfigError,
    StructureGraph,
    UnsupportedModelError,
    apply_removal,
)
from curvprune.structure.norms import kept_statistics
from curvprune.testing.nets import randomize_
from curvprune.testing.removal import check, gap, structured

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlock, LayerNorm2d  # noqa: E402
from torchvision.ops.misc import Permute  # noqa: E402


# --------------------------------------------------------------------------------------------
# Channels-last blocks: permute, LayerNorm, Linear, layer scale (ConvNeXt)
# --------------------------------------------------------------------------------------------
class TinyConvNeXt(nn.Module):
    """torchvision's ConvNeXt pieces at toy width: a stem conv and LayerNorm2d, two CNBlocks
    (depthwise conv, Permute, LayerNorm, Linear, GELU, Linear, Permute, layer scale,
    StochasticDepth, residual add), a LayerNorm2d + strided-conv downsample, one more block,
    then pool, LayerNorm2d, flatten and the classifier."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, stride=2), LayerNorm2d(c))
        self.stage1 = nn.Sequential(CNBlock(c, 1e-6, 0.0), CNBlock(c, 1e-6, 0.0))
        self.down = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, 2 * c, 2, stride=2))
        self.stage2 = CNBlock(2 * c, 1e-6, 0.0)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), LayerNorm2d(2 * c), nn.Flatten(1),
                                  nn.Linear(2 * c, 5))

    def forward(self, x):
        return self.head(self.stage2(self.down(self.stage1(self.stem(x)))))


class ChannelsLast(nn.Module):
    """The permutes written three ways (``x.permute``, ``torch.permute``, torchvision
    ``Permute``, ``transpose``), a LayerNorm over the last dim, a layer scale of shape [C], a
    fixed scale buffer of shape [C, 1, 1], and a flatten of a C×H×W map into a Linear (H·W
    features per channel)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)
        self.scale = nn.Parameter(torch.ones(c))
        self.register_buffer("fixed", torch.linspace(0.5, 1.5, c)[:, None, None])
        self.back = Permute([0, 3, 1, 2])
        self.mix = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c * 16, 5)

    def forward(self, x):
        y = self.conv(x)  # [N, C, 4, 4]
        z = self.norm(y.permute(0, 2, 3, 1))
        z = self.fc2(torch.relu(self.fc1(z))) * self.scale
        y = (y + self.back(z)) * self.fixed
        y = self.mix(torch.permute(y.transpose(1, 3), [0, 3, 2, 1]))
        return self.fc(torch.flatten(torch.relu(y), 1))


class PatchEmbed(nn.Module):
    """A patch embedding read two ways (``flatten(2).transpose(1, 2)`` and
    ``reshape(n, c, h * w).permute(0, 2, 1)``), a pre-norm MLP block on the tokens, and a mean
    over the tokens into the head."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c, 2, stride=2)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        y = self.proj(x)
        n, c, h, w = y.shape
        t = y.flatten(2).transpose(1, 2) + y.reshape(n, c, h * w).permute(0, 2, 1)
        t = t + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


class GroupNormNet(nn.Module):
    """GroupNorm of 3 groups of 4 channels, then a GroupNorm of one channel per group, and a
    residual stream normalised by a GroupNorm of 2 groups of 3 channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.gn_a = nn.GroupNorm(3, 12)
        self.b = nn.Conv2d(12, 6, 1)
        self.gn_b = nn.GroupNorm(6, 6)
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.gn_c = nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.gn_b(self.b(torch.relu(self.gn_a(self.a(x))))))
        y = y + self.gn_c(self.c(y))
        return self.fc(y.mean((2, 3)))


def test_convnext_blocks_trace_into_streams_and_hidden_groups():
    graph = StructureGraph.trace(TinyConvNeXt())
    stream = graph.group("stem.0")
    assert stream.removable, stream.reason
    assert stream.producers == ("stem.0", "stage1.0.block.5", "stage1.1.block.5")
    assert stream.depthwise == ("stage1.0.block.0", "stage1.1.block.0")
    assert stream.renorms == ("stem.1", "stage1.0.block.2", "stage1.1.block.2", "down.0")
    assert stream.scales == (("stage1.0.layer_scale", 0), ("stage1.1.layer_scale", 0))
    assert stream.consumers == (("stage1.0.block.3", 1), ("stage1.1.block.3", 1),
                                ("down.1", 1))
    # gates: on dim 1 after the conv and each LayerNorm2d, on the last dim after the
    # channels-last LayerNorms and the second Linear of each block
    gates = dict(zip(stream.gates, stream.gate_dims, strict=True))
    assert gates["stem.1"] == 1 and gates["stage1.0.block.2"] == -1
    assert gates["stage1.0.block.5"] == -1 and gates["down.0"] == 1
    hidden = graph.group("stage1.0.block.3")
    assert hidden.removable and hidden.consumers == (("stage1.0.block.5", 1),)
    assert graph.group("head.3").reason == "its channels reach the model output"


def test_channels_last_ops_are_followed():
    graph = StructureGraph.trace(ChannelsLast())
    g = graph.group("conv")
    assert g.removable, g.reason
    assert g.producers == ("conv", "fc2") and g.renorms == ("norm",)
    assert set(g.scales) == {("scale", 0), ("fixed", 0)}
    assert g.consumers == (("fc1", 1), ("mix", 1))
    assert graph.group("mix").consumers == (("fc", 16),)  # a 4×4 block per channel


def test_patch_embeddings_become_tokens_of_the_stream():
    graph = StructureGraph.trace(PatchEmbed())
    g = graph.group("proj")
    assert g.removable, g.reason
    assert g.producers == ("proj", "fc2") and g.renorms == ("norm",)
    assert g.consumers == (("fc1", 1), ("head", 1))


@pytest.mark.parametrize("name", ["convnext", "channels-last", "patch-embed"])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_removed_equals_the_model_without_the_channels(name, data):
    build = {"convnext": TinyConvNeXt, "channels-last": ChannelsLast,
             "patch-embed": PatchEmbed}[name]
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(build().double(), gen).eval()
    n = structured(model).n_structures
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    x = torch.randn(2, 3, 8 if name == "convnext" else 4, 8 if name == "convnext" else 4,
                    generator=gen, dtype=torch.float64)
    removed, layout, _ = check(model, keep, x)
    assert removed(x).shape == (2, 5)
    kept = {g.name: keep[layout.structures.group_slice(i)].nonzero().squeeze(1).tolist()
            for i, g in enumerate(layout.structures.groups)}
    fresh = build().double()
    apply_removal(fresh, kept)
    fresh.load_state_dict(removed.state_dict())  # the record rebuilds the architecture


def test_layer_norm_statistics_change_with_removal_and_the_masked_model_differs():
    model = randomize_(TinyConvNeXt().double(), torch.Generator().manual_seed(3)).eval()
    layout = structured(model)
    keep = torch.ones(layout.n_structures, dtype=torch.bool)
    stream = next(i for i, g in enumerate(layout.structures.groups) if g.name == "stem.0")
    keep[layout.structures.group_slice(stream).start] = False  # one stream channel
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    removed, _, plain_gap = check(model, keep, x)
    assert plain_gap > 1e-6  # the LayerNorms no longer count the zero: masked != removed
    assert removed.stem[1].normalized_shape == (5,) and removed.stem[1].weight.shape == (5,)
    assert removed.stage1[0].layer_scale.shape == (5, 1, 1)
    assert removed.stage1[0].block[3].in_features == 5


def test_the_pipeline_warns_that_layer_norms_make_removal_differ_from_masking():
    from curvprune import Pipeline
    from curvprune.errors import CurvpruneWarning

    model = randomize_(TinyConvNeXt().double(), torch.Generator().manual_seed(7)).eval()
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    })
    with pytest.warns(CurvpruneWarning, match=r"LayerNorms over prunable channels \(stem.1, "):
        result = pipe.prune(model, None)
    layout = result.masks.layout
    keep = layout.alive_structures(result.masks.flat)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    with torch.no_grad(), kept_statistics(model, layout.structures, keep):
        reference = model(x)
    pipe.remove(model, result.masks)
    with torch.no_grad():
        assert gap(model(x), reference) <= 1e-12
    assert model.stem[0].out_channels == 3  # half of the stream's 6 channels


def test_a_run_records_the_renormalised_layer_norms_and_both_differences():
    from curvprune import Pipeline
    from curvprune.run.removal import remove_for_run

    model = randomize_(TinyConvNeXt().double(), torch.Generator().manual_seed(9)).eval()
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    })
    with pytest.warns(Warning):
        result = pipe.prune(model, None)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    _, record = remove_for_run(pipe, model, result, x)
    assert {"down.0", "head.1", "stage1.0.block.2"} <= set(record["renormalised"])
    assert record["max_output_difference"] <= 1e-12 < 1e-6 < record["masked_output_difference"]


def test_group_norm_keeps_whole_groups_and_is_exact():
    graph = StructureGraph.trace(GroupNormNet())
    a = graph.group("a")
    assert a.removable and (a.size, a.block, a.channels) == (3, 4, 12)
    assert a.channel_index([0, 2]).tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    b = graph.group("b")  # the stream: gn_b (1 channel per group) and gn_c (3 per group)
    assert (b.size, b.block, b.producers) == (2, 3, ("b", "c"))
    model = randomize_(GroupNormNet().double(), torch.Generator().manual_seed(5)).eval()
    keep = torch.tensor([True, False, True] + [False, True])
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    removed, _, plain_gap = check(model, keep, x)
    assert plain_gap <= 1e-12  # whole groups: the masked model is the reference itself
    assert (removed.gn_a.num_groups, removed.gn_a.num_channels) == (2, 8)
    assert (removed.gn_b.num_groups, removed.gn_c.num_groups) == (3, 1)


class CatLayerNorm(nn.Module):
    """Two maps concatenated, then channels-last: one LayerNorm over both groups at their
    offsets, a Linear, and back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)
        self.norm = nn.LayerNorm(5)
        self.fc = nn.Linear(5, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1).permute(0, 2, 3, 1)
        return self.head(torch.relu(self.fc(self.norm(y))).mean((1, 2)))


class GroupedGroupNorm(nn.Module):
    """A GroupNorm of 4 groups of 2 channels on a map a grouped conv (2 groups) reads: a
    structure is one GroupNorm group in each conv group (2 × 2 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.g = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.g(torch.relu(self.gn(self.a(x)))).mean((2, 3)))


@pytest.mark.parametrize("build", [CatLayerNorm, GroupedGroupNorm])
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_norms_at_offsets_and_in_conv_groups_remove_exactly(build, data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(build().double(), gen).eval()
    n = structured(model).n_structures
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    removed, layout, _ = check(model, keep, x)
    assert removed(x).shape == (2, 5)


def test_norm_layouts_at_offsets_and_in_conv_groups():
    b = StructureGraph.trace(CatLayerNorm()).group("b")
    assert b.removable and b.laid("norms") == [("norm", 3, 0, 2, 1)] and b.renorms == ("norm",)
    a = StructureGraph.trace(GroupedGroupNorm()).group("a")
    assert (a.size, a.copies, a.block) == (2, 2, 2)
    assert a.channel_index([1]).tolist() == [2, 3, 6, 7]


def test_group_norm_that_cannot_keep_whole_groups_is_refused():
    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.gn = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.GroupNorm(2, 4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.gn(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))

    reason = StructureGraph.trace(Cat()).group("a").reason
    assert "GroupNorm 'gn' reads a concatenation or a chunk" in reason
    odd = nn.Sequential(nn.Conv2d(3, 6, 1), nn.GroupNorm(3, 6), nn.Conv2d(6, 4, 1, groups=2),
                        nn.Flatten(), nn.LazyLinear(2))
    reason = StructureGraph.trace(odd).group("0").reason
    assert "needs the 6 channels in whole blocks of 2 in each of 2 equal parts" in reason


# --------------------------------------------------------------------------------------------
# torch.split at literal sizes: rewritten in a GraphModule, refused in a plain module
# --------------------------------------------------------------------------------------------
class SplitPieces(nn.Module):
    """A map split unequally into three pieces (a consumer, a pass into a concatenation, a
    BatchNorm and a conv), and ``x.split(3, 1)`` of another into two pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 9, 3, padding=1)
        self.b = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 1)
        self.d = nn.Conv2d(3, 6, 1)
        self.e = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(14, 5)

    def forward(self, x):
        p0, p1, p2 = torch.split(torch.relu(self.a(x)), [2, 3, 4], dim=1)
        q0, q1 = self.d(x).split(3, 1)
        y = torch.cat([self.b(p0), p1, self.c(torch.relu(self.bn(p2))) + self.e(q0), q1], 1)
        return self.fc(y.mean((2, 3)))


def test_split_pieces_are_windows_and_literals_are_refused_outside_a_graph_module():
    reason = StructureGraph.trace(SplitPieces()).group("a").reason
    assert reason == ("split at node 'split' has literal sizes [2, 3, 4] that a removal would "
                      "leave stale (a torch.fx.GraphModule's are rewritten)")
    graph = StructureGraph.trace(torch.fx.symbolic_trace(SplitPieces()))
    a, d = graph.group("a"), graph.group("d")
    assert a.removable and d.removable, (a.reason, d.reason)
    assert a.splits == (("split", ((0, 2), (2, 5), (5, 9))),)
    assert a.placed("consumers") == [(("b", 1), 0, 0, 2), (("c", 1), 0, 5, 9),
                                     (("fc", 1), 4, 2, 5)]
    assert a.placed("norms") == [("bn", 0, 5, 9)]
    assert d.splits == (("split_1", ((0, 3), (3, 6))),)
    with pytest.raises(UnsupportedModelError, match="split at node 'split' has literal sizes"):
        apply_removal(SplitPieces(), {"a": [0, 1, 2]})
    with pytest.raises(ConfigError, match="leave piece 1 of torch.split at node 'split'"):
        apply_removal(torch.fx.symbolic_trace(SplitPieces()), {"a": [0, 5]})


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_split_removal_rewrites_the_sizes_and_equals_the_masked_model(data):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = torch.fx.symbolic_trace(randomize_(SplitPieces().double(), gen).eval())
    layout = structured(model)
    n = layout.n_structures
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    for i, g in enumerate(layout.structures.groups):  # one kept channel in every piece
        for _, windows in g.splits:
            for lo, _ in windows:
                keep[layout.structures.group_slice(i).start + lo] = True
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    removed, layout, plain_gap = check(model, keep, x)
    assert plain_gap <= 1e-12 and removed(x).shape == (2, 5)
    kept = {g.name: keep[layout.structures.group_slice(i)].nonzero().squeeze(1).tolist()
            for i, g in enumerate(layout.structures.groups)}
    sizes = [int(keep[layout.structures.group_slice(0)][lo:hi].sum())
             for lo, hi in ((0, 2), (2, 5), (5, 9))]
    split = next(n for n in removed.graph.nodes if n.name == "split")
    assert split.args[1] == sizes
    fresh = torch.fx.symbolic_trace(SplitPieces().double())
    apply_removal(fresh, kept)
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert gap(fresh.eval()(x), removed(x)) <= 1e-12


# --------------------------------------------------------------------------------------------
# What stays refused: one line, the op and the node named
# --------------------------------------------------------------------------------------------
class _Odd(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm([4, 6, 6])
        self.fc = nn.Linear(4, 2)
        self.big = nn.Linear(4 * 36, 2)
        self.bias = nn.Parameter(torch.zeros(4, 6))

    def forward(self, x):
        y = self.conv(x)
        if self.how == "roll":
            y = torch.roll(y, 1, dims=1)
        elif self.how == "permute-away":
            return self.fc(y.permute(1, 0, 2, 3).mean((2, 3)))
        elif self.how == "layer-norm-chw":
            y = self.norm(y)
        elif self.how == "functional-layer-norm":
            y = torch.nn.functional.layer_norm(y.permute(0, 2, 3, 1), (4,)).permute(0, 3, 1, 2)
        elif self.how == "flatten-channels-last":
            return self.big(y.permute(0, 2, 3, 1).flatten(1))
        elif self.how == "scale-2d":
            y = y * self.bias
        elif self.how == "scale-from-size":
            y = y * torch.arange(y.size(1)).view(1, -1, 1, 1)
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize(("how", "reason"), [
    ("roll", "roll at node 'roll' is not handled"),
    ("permute-away", "permute at node 'permute' moves the channels to dim 0 of 4"),
    ("layer-norm-chw", "LayerNorm 'norm' normalises (4, 6, 6) on the last dim, not the 4 "
                       "channels alone"),
    ("functional-layer-norm", "layer_norm at node 'layer_norm' normalises across the channels"),
    ("flatten-channels-last", "flatten at 'flatten' of features that are not a channel map"),
    ("scale-2d", "mul at node 'mul' multiplies the channels by parameter 'bias' of shape [4, 6]"),
    ("scale-from-size", "mul at node 'mul' is not handled"),
])
def test_unknown_ops_on_a_channel_path_are_refused_in_one_line(how, reason):
    group = StructureGraph.trace(_Odd(how)).group("conv")
    assert not group.removable and reason in group.reason
    assert "\n" not in group.reason
    with pytest.raises(UnsupportedModelError, match="cannot remove channels of group 'conv'"):
        apply_removal(_Odd(how), {"conv": [0, 1]})


@pytest.mark.slow
def test_torchvision_convnext_tiny_removes_exactly_against_kept_statistics():
    model = randomize_(torchvision.models.convnext_tiny(weights=None).double(),
                       torch.Generator().manual_seed(0)).eval()
    for block in model.modules():  # layer scales of a trained size, so blocks matter
        if isinstance(block, CNBlock):
            block.layer_scale.data.fill_(0.1)
    graph = StructureGraph.trace(model)
    refused = [g.name for g in graph.groups if not g.removable]
    assert refused == ["classifier.2"]
    layout = structured(model)
    keep = torch.rand(layout.n_structures, generator=torch.Generator().manual_seed(1)) > 0.3
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    removed, _, plain_gap = check(model, keep, x, rel=1e-12)
    assert removed(x).shape == (1, 1000) and plain_gap > 1e-6
