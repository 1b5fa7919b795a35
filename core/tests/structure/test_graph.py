"""Channel structures: tracing groups, coupling, gates, structure masks and the channel mask.

Ground truths are written out by hand for small models (which modules produce, normalise and
read each group) and, for gates, the masked model computed independently: a zero gate must give
exactly the same float64 output as zeroing the structure's weights, biases and BN γ, β.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune import (
    ConfigError,
    MaskSet,
    Pipeline,
    StructureGraph,
    UnsupportedModelError,
    select_parameters,
)
from curvprune.run.models import DigitsCNN
from curvprune.testing.nets import (
    PadShortcutNet,
    SplitNet,
    TinyResNet,
    randomize_,
    sequential_cnn,
)

HOST = curvprune.get_plugin_manager(autoload=False)


def structured(model: nn.Module, **select):
    layout = select_parameters(model, **select)
    return layout.with_structures(StructureGraph.trace(model).structures(layout))


def weights_mask(keep: torch.Tensor, layout) -> torch.Tensor:
    """Weight keep-mask [d] from a structure keep-mask [S] (rows of id -1 kept)."""
    sid = layout.structure_index()
    never = torch.ones_like(sid, dtype=torch.bool)
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], never)
    return per_channel[layout.channel_index()]


def masked_copy(model: nn.Module, layout, keep: torch.Tensor) -> nn.Module:
    import copy

    twin = copy.deepcopy(model)
    masks = MaskSet(layout, weights_mask(keep, layout))
    masks.with_extra(layout.structures.gate_masks(keep)).apply_(twin)
    return twin


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------
def test_digits_cnn_groups_and_flatten():
    graph = StructureGraph.trace(DigitsCNN(width=4))
    by_name = {g.name: g for g in graph.groups}
    assert list(by_name) == ["0", "3", "8", "10"]
    assert by_name["0"].norms == ("1",) and by_name["0"].consumers == (("3", 1),)
    assert by_name["0"].gates == ("1",)  # gated after the BN
    # the last conv is flattened (8 channels, 4x4 after the pool): 16 features per channel
    assert by_name["3"].consumers == (("8", 16),) and by_name["3"].size == 8
    assert by_name["8"].channel_dim == -1 and by_name["8"].consumers == (("10", 1),)
    assert all(g.removable and not g.coupled for g in graph.groups[:3])
    classifier = by_name["10"]
    assert not classifier.removable and "model output" in classifier.reason


@pytest.mark.slow
def test_resnet18_streams_are_coupled():
    torchvision = pytest.importorskip("torchvision")
    graph = StructureGraph.trace(torchvision.models.resnet18(num_classes=10))
    stream1 = graph.group("conv1")
    assert stream1.coupled and stream1.removable
    assert stream1.producers == ("conv1", "layer1.0.conv2", "layer1.1.conv2")
    assert stream1.norms == ("bn1", "layer1.0.bn2", "layer1.1.bn2")
    assert set(stream1.consumers) == {("layer1.0.conv1", 1), ("layer1.1.conv1", 1),
                                      ("layer2.0.conv1", 1), ("layer2.0.downsample.0", 1)}
    stream2 = graph.group("layer2.0.conv2")
    assert stream2.producers == ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")
    assert stream2.gates == ("layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2")
    inner = graph.group("layer1.0.conv1")
    assert not inner.coupled and inner.consumers == (("layer1.0.conv2", 1),)
    # the last stream feeds the classifier through avgpool + flatten: 1 feature per channel
    stream4 = graph.group("layer4.0.conv2")
    assert ("fc", 1) in stream4.consumers and stream4.removable
    assert not graph.group("fc").removable
    # 4 streams + 8 block-internal convs + the classifier
    assert len(graph.groups) == 13 and sum(g.coupled for g in graph.groups) == 4


def test_bottleneck_streams():
    graph = StructureGraph.trace(TinyResNet("bottleneck", widths=(2, 3), blocks=2, stem=3))
    stream = graph.group("layers.0.0.conv3")
    # named after its first producer in execution order (this block runs its downsample first)
    assert stream.name == "layers.0.0.downsample.0"
    assert set(stream.producers) == {
        "layers.0.0.conv3", "layers.0.0.downsample.0", "layers.0.1.conv3"}
    assert graph.group("conv1").producers == ("conv1",)  # the stem feeds a downsample: no add
    assert graph.group("layers.1.0.conv3").coupled
    internal = [g for g in graph.groups
                if g.name.endswith(("conv1", "conv2")) and g.name != "conv1"]
    assert len(internal) == 8 and not any(g.coupled for g in internal)


def test_pad_and_split_are_not_removable_and_named():
    pad = StructureGraph.trace(PadShortcutNet())
    g1, g2 = pad.group("conv1"), pad.group("conv2")
    assert not g1.removable and "getitem" in g1.reason and "node" in g1.reason
    assert not g2.removable and "untracked" in g2.reason
    split = StructureGraph.trace(SplitNet())
    assert not split.group("a").removable and "split at node" in split.group("a").reason
    assert split.group("b").removable


def test_grouped_conv_keeps_groups_equal_and_nonzero_activation_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Sigmoid(),
                          nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(2, 3))
    graph = StructureGraph.trace(model)
    assert graph.group("0").removable and graph.group("0").copies == 2
    assert graph.group("0").size == 2 and graph.group("0").channels == 4
    assert "Sigmoid '2' maps a zero channel to a nonzero value" in graph.group("1").reason
    assert "nn.Flatten" not in (graph.group("3").reason or "")


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not symbolically traceable
            x = -x
        return self.conv(x)


def test_untraceable_model_names_the_cause():
    with pytest.raises(UnsupportedModelError,
                       match=r"cannot trace _Branchy with torch.fx .* @ model"):
        StructureGraph.trace(_Branchy())


def test_linear_not_a_multiple_of_the_flattened_channels():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.Linear(10, 2))
    with pytest.raises(UnsupportedModelError, match=r"Linear '2' has in_features=10"):
        StructureGraph.trace(model)


# --------------------------------------------------------------------------------------------
# Structures of a layout
# --------------------------------------------------------------------------------------------
def test_structures_ids_and_unselected_producers():
    model = TinyResNet("basic", widths=(2, 3), blocks=2, stem=2)
    layout = structured(model)
    s = layout.structures
    assert [g.name for g in s.groups][:3] == ["conv1", "layers.0.0.conv1", "layers.0.1.conv1"]
    assert s.offsets[:3] == (0, 2, 4)
    assert layout.n_structures == sum(g.size for g in s.groups) == len(s.names())
    # the classifier's rows are never pruned
    fc = layout.names.index("fc.weight")
    start = sum(layout.channels[:fc])
    assert (layout.structure_index()[start:] == -1).all()
    # the stream's channel c is one structure, shared by all its producers' rows
    sid = layout.structure_index()
    rows = [sum(layout.channels[: layout.names.index(f"{p}.weight")])
            for p in s.groups[0].producers]
    assert all(sid[r].item() == 0 and sid[r + 1].item() == 1 for r in rows)
    assert layout.structure_group().tolist() == s.structure_group.tolist()
    # ignoring one producer of the stream makes the whole stream unprunable
    partial = structured(model, ignore=["layers.0.1.conv2"])
    assert "conv1" not in [g.name for g in partial.structures.groups]


def test_identity_structures_without_tracing():
    layout = select_parameters(DigitsCNN(width=2))
    assert layout.structures is None
    assert layout.n_structures == sum(layout.channels)
    assert layout.structure_index().tolist() == list(range(sum(layout.channels)))
    assert layout.structure_group().tolist() == layout.channel_param_index().tolist()


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------
@settings(max_examples=6, deadline=None)
@given(block=st.sampled_from(["basic", "bottleneck"]), seed=st.integers(0, 2**16))
def test_zero_gate_equals_masking(block, seed):
    gen = torch.Generator().manual_seed(seed)
    model = randomize_(TinyResNet(block, widths=(2, 3), blocks=2, stem=3).double(), gen).eval()
    layout = structured(model)
    keep = torch.rand(layout.n_structures, generator=gen) > 0.4
    x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
    with layout.structures.gates(model, keep.double()):
        gated = model(x)
    masked = masked_copy(model, layout, keep)(x)
    assert torch.equal(gated, masked)  # removed channels are exactly 0 in both
    # the hooks are gone after the context
    assert not any(m._forward_hooks for m in model.modules())


def test_gate_gradient_matches_finite_difference():
    gen = torch.Generator().manual_seed(3)
    model = randomize_(TinyResNet("basic", widths=(2,), blocks=2, stem=2).double(), gen).eval()
    layout = structured(model)
    x = torch.randn(3, 3, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])

    def loss(values):
        with layout.structures.gates(model, values):
            return F.cross_entropy(model(x), y)

    values = torch.ones(layout.n_structures, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(values), values)
    eps = 1e-6
    for s in range(layout.n_structures):
        e = torch.zeros_like(values).detach()
        e[s] = eps
        with torch.no_grad():
            numeric = (loss(values.detach() + e) - loss(values.detach() - e)) / (2 * eps)
        assert abs(float(grad[s]) - float(numeric)) < 1e-7


def test_gate_values_shape_is_checked():
    model = DigitsCNN(width=2)
    layout = structured(model)
    with pytest.raises(ValueError, match=r"gate values must have shape"):
        with layout.structures.gates(model, torch.ones(3)):
            pass


# --------------------------------------------------------------------------------------------
# Masks with structures
# --------------------------------------------------------------------------------------------
def test_maskset_extra_masks_are_enforced():
    model = sequential_cnn([2, 3], classes=2)
    layout = structured(model)
    keep = torch.tensor([True, False, True, False, True])
    masks = MaskSet(layout, weights_mask(keep, layout)).with_extra(
        layout.structures.gate_masks(keep))
    assert set(masks.extra) == {"0.bias", "1.weight", "1.bias", "3.bias", "4.weight", "4.bias"}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    masks.apply_(model)
    masks.mask_grads_(model)
    masks.mask_optimizer_state_(opt, model)
    assert model[1].bias[1] == 0 and model[4].weight[1] == 0 and model[4].weight[0] != 0
    assert model[0].bias.grad[1] == 0 and opt.state[model[3].bias]["momentum_buffer"][1] == 0
    loaded = MaskSet.from_tensors(layout, masks.tensors())
    assert torch.equal(loaded.flat, masks.flat) and loaded.extra.keys() == masks.extra.keys()


def test_channel_mask_prunes_coupled_structures_and_never_the_classifier():
    model = TinyResNet("basic", widths=(2, 3), blocks=1, stem=2)
    layout = structured(model)
    applier = curvprune.create("mask", "channel", host=HOST, min_channels=1)
    scores = torch.arange(layout.n_structures, dtype=torch.float64)
    mask = applier.select(scores, torch.ones(layout.d, dtype=torch.bool), 0.5, layout)
    alive = layout.alive_structures(mask)
    assert int((~alive).sum()) == round(0.5 * layout.n_structures)
    # every producer row of a removed structure is zero; classifier rows untouched
    sid = layout.structure_index()
    removed_rows = (sid >= 0) & ~alive[sid.clamp_min(0)]
    channel_alive = torch.zeros(sum(layout.channels), dtype=torch.long).index_add_(
        0, layout.channel_index(), mask.long()) > 0
    assert torch.equal(channel_alive, ~removed_rows)
    group = layout.structure_group()
    for g in range(len(layout.structures.groups)):
        assert alive[group == g].sum() >= 1
    achieved = applier.achieved_sparsity(mask, layout)
    assert achieved == pytest.approx(0.5, abs=0.5 / layout.n_structures)


def test_channel_mask_overrides_per_group():
    model = sequential_cnn([4, 4], hidden=[4], classes=2)
    layout = structured(model)
    applier = curvprune.create("mask", "channel", host=HOST, scope="layerwise",
                               overrides={"3": 0.75, "re:7\\.weight": 0.0})
    mask = applier.select(torch.rand(layout.n_structures), torch.ones(layout.d, dtype=torch.bool),
                          0.5, layout)
    alive = layout.alive_structures(mask).view(3, 4).sum(1).tolist()
    assert alive == [2, 1, 4]
    for bad, message in [({"nope": 0.5}, "matches no pruned parameter"),
                         ({"9": 0.5}, "cannot be pruned")]:
        applier = curvprune.create("mask", "channel", host=HOST, scope="layerwise", overrides=bad)
        with pytest.raises(ConfigError, match=message):
            applier.select(torch.rand(layout.n_structures), torch.ones(layout.d, dtype=torch.bool),
                           0.5, layout)
    with pytest.raises(ConfigError, match="overrides need scope = 'layerwise'"):
        Pipeline.from_config({"prune": {"sparsity": 0.5},
                              "scorer": {"name": "magnitude", "granularity": "channel"},
                              "mask": {"name": "channel", "overrides": {"3": 0.5}}}, host=HOST)


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_magnitude_sums_over_coupled_rows(norm):
    gen = torch.Generator().manual_seed(0)
    model = randomize_(TinyResNet("basic", widths=(2,), blocks=2, stem=2), gen)
    layout = structured(model)
    ctx = curvprune.PruneContext(model=model, layout=layout, weights=layout.gather(model),
                                 mask=torch.ones(layout.d, dtype=torch.bool), target_sparsity=0.5)
    scores = curvprune.create("scorer", "magnitude", host=HOST, granularity="channel",
                              norm=norm, normalize="none", extent="producers").score(ctx)
    params = dict(model.named_parameters())
    for g, off in zip(layout.structures.groups, layout.structures.offsets, strict=True):
        for c in range(g.size):
            rows = [params[f"{p}.weight"].detach()[c] for p in g.producers]
            expected = sum(r.abs().sum() for r in rows) if norm == "l1" else torch.sqrt(
                sum(r.square().sum() for r in rows))
            assert scores[off + c].item() == pytest.approx(float(expected), rel=1e-6)

def test_channel_magnitude_is_normalized_by_its_groups_mean_by_default():
    """The default divides each structure's norm by the mean over its group's kept structures
    (so a global ranking cannot take a small-weight layer down to one channel)."""
    gen = torch.Generator().manual_seed(0)
    model = randomize_(TinyResNet("basic", widths=(2,), blocks=2, stem=2), gen)
    layout = structured(model)
    mask = torch.ones(layout.d, dtype=torch.bool)
    ctx = curvprune.PruneContext(model=model, layout=layout, weights=layout.gather(model),
                                 mask=mask, target_sparsity=0.5)
    raw = curvprune.create("scorer", "magnitude", host=HOST, granularity="channel",
                           normalize="none").score(ctx)
    scores = curvprune.create("scorer", "magnitude", host=HOST, granularity="channel").score(ctx)
    group = layout.structure_group()
    for g in range(layout.n_structure_groups):
        members = group == g
        torch.testing.assert_close(scores[members], raw[members] / raw[members].mean())



def test_pipeline_prune_gates_structures_exactly():
    gen = torch.Generator().manual_seed(1)
    model = TinyResNet("bottleneck", widths=(2, 2), blocks=1, stem=2).double()
    model = randomize_(model, gen).eval()
    pipe = Pipeline.from_config({"prune": {"sparsity": 0.4, "loss_samples": 0},
                                 "scorer": {"name": "magnitude", "granularity": "channel"},
                                 "mask": {"name": "channel"}}, host=HOST)
    result = pipe.prune(model, None)
    assert result.masks.extra  # biases/BN affine of removed structures
    layout = structured(model)
    keep = layout.alive_structures(result.masks.flat)
    assert int((~keep).sum()) == round(0.4 * layout.n_structures)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    with layout.structures.gates(model, keep.double()):
        gated = model(x)
    assert torch.equal(gated, model(x))  # masked already: the gates change nothing


def test_remove_without_coupling_is_rejected():
    with pytest.raises(ConfigError, match=r"remove = true needs coupled = true .* @ mask.remove"):
        Pipeline.from_config({"prune": {"sparsity": 0.5},
                              "scorer": {"name": "magnitude", "granularity": "channel"},
                              "mask": {"name": "channel", "remove": True, "coupled": False}},
                             host=HOST)


def test_nothing_prunable_is_a_clear_error():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    pipe = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 0},
                                 "scorer": {"name": "magnitude", "granularity": "channel"},
                                 "mask": {"name": "channel"}}, host=HOST)
    with pytest.raises(UnsupportedModelError, match=r"no selected channel can be pruned \(1: its "
                                                   r"channels reach the model output\)"):
        pipe.prune(model, None)


def test_failed_prune_restores_biases_and_batchnorm(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    model = randomize_(TinyResNet("basic", widths=(2, 3), blocks=1, stem=2), gen)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pipe = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 0},
                                 "scorer": {"name": "magnitude", "granularity": "channel"},
                                 "schedule": {"name": "oneshot", "steps": 2},
                                 "mask": {"name": "channel"}}, host=HOST)
    select, calls = pipe.mask.select, []

    def failing_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return select(*args, **kwargs)

    monkeypatch.setattr(pipe.mask, "select", failing_second_step)
    with pytest.raises(RuntimeError, match="boom"):
        pipe.prune(model, None)
    assert len(calls) == 2  # the first step zeroed structures, BN γ and β included
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "running" not in k)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), which=st.integers(0, 1))
def test_layout_channel_helpers_match_index_forms(seed, which):
    gen = torch.Generator().manual_seed(seed)
    model = [TinyResNet("basic", (2, 3), 1, 2), sequential_cnn([2, 3], [2])][which]
    layout = structured(model)
    channel = layout.channel_index()
    values = torch.randn(layout.d, generator=gen, dtype=torch.float64)
    mask = torch.rand(layout.d, generator=gen) > 0.9
    n = sum(layout.channels)
    sums = torch.zeros(n, dtype=torch.float64).index_add_(0, channel, values)
    assert torch.allclose(layout.channel_sums(values), sums, rtol=1e-12, atol=1e-12)
    alive = torch.zeros(n, dtype=torch.long).index_add_(0, channel, mask.long()) > 0
    assert torch.equal(layout.alive_channels(mask), alive)
    per_channel = torch.randn(n, generator=gen)
    assert torch.equal(layout.expand_channels(per_channel), per_channel[channel])


def test_batchnorm_without_affine_warns_for_masks_and_refuses_removal():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 2))
    options = {"prune": {"sparsity": 0.5, "loss_samples": 0},
               "scorer": {"name": "magnitude", "granularity": "channel"},
               "mask": {"name": "channel"}}
    with pytest.warns(UserWarning, match=r"BatchNorm layers without affine parameters \(1\)"):
        Pipeline.from_config(options, host=HOST).prune(model, None)
    options["mask"]["remove"] = True
    with pytest.raises(UnsupportedModelError, match=r"\(1\) cannot be gated exactly.*@ mask.remove"):
        Pipeline.from_config(options, host=HOST).prune(nn.Sequential(*model), None)


def _channel_pipeline(**mask):
    return Pipeline.from_config({
        "prune": {"sparsity": 0.3},
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "mask": {"name": "channel", **mask},
    }, host=curvprune.get_plugin_manager(autoload=False))


def test_a_selected_group_that_cannot_be_pruned_is_a_warning_naming_why():
    from curvprune import StructureSkipWarning
    from curvprune.structure.graph import attach_structures


    model, pipeline = SplitNet(), _channel_pipeline()
    with pytest.warns(StructureSkipWarning, match=r"1 selected channel group\(s\) cannot be "
                                                   r"pruned.*split at node 'split'"):
        layout = attach_structures(pipeline.mask, pipeline.select(model), model)
    assert layout.structures.n_structures > 0  # the other groups are still pruned


def test_strict_makes_a_skipped_group_an_error():
    from curvprune.structure.graph import attach_structures


    model, pipeline = SplitNet(), _channel_pipeline(strict=True)
    with pytest.raises(curvprune.UnsupportedModelError, match=r"stay dense.*@ mask\.strict"):
        attach_structures(pipeline.mask, pipeline.select(model), model)


def test_the_classifier_is_never_pruned_and_never_warned_about(recwarn):
    from curvprune.structure.graph import attach_structures

    model, pipeline = DigitsCNN(), _channel_pipeline()
    attach_structures(pipeline.mask, pipeline.select(model), model)
    assert not [w for w in recwarn if issubclass(w.category, curvprune.CurvpruneWarning)]
