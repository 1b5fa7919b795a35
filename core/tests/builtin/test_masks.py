"""The builtin mask appliers against brute-force references written with plain Python loops.

Scores are small integers stored as floats, so ties are frequent and every comparison is exact:
the references and the appliers must agree bit for bit, with no tolerance.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune import ConfigError, NMMask, ParamLayout, Pipeline, get_plugin_manager
from curvprune.builtin.masks import ChannelMask, GlobalMask, LayerwiseMask, NMMask
from curvprune.builtin.selection import prune_lowest, rank_alive_in_rows, rank_within_groups
from curvprune.config import PruneConfig

# Builtins only: the tests must not depend on which other plugins happen to be installed.
HOST = curvprune.get_plugin_manager(autoload=False)


def create(kind: str, name: str, **options):
    return curvprune.create(kind, name, host=HOST, **options)


# --------------------------------------------------------------------------------------------
# Helpers and references
# --------------------------------------------------------------------------------------------
def make_layout(*shapes: tuple[int, ...]) -> curvprune.ParamLayout:
    return curvprune.ParamLayout(
        names=tuple(f"layer{i}.weight" for i in range(len(shapes))),
        shapes=tuple(torch.Size(s) for s in shapes),
        module_types=tuple("Linear" if len(s) == 2 else "Conv2d" for s in shapes),
    )


def dense_mask(layout: curvprune.ParamLayout) -> torch.Tensor:
    return torch.ones(layout.d, dtype=torch.bool)


def layer_of(layout: curvprune.ParamLayout) -> list[int]:
    return [i for i, n in enumerate(layout.sizes) for _ in range(n)]


def exact_floor(fraction: float, n: int) -> int:
    """floor(fraction·n) with ``fraction`` read as the decimal it was written as."""
    return math.floor(Fraction(repr(fraction)) * n)


def ref_global(scores, mask, sparsity, layout, max_layer_sparsity=1.0, min_keep=1):
    """Greedy: walk kept weights by (score, index); prune while the layer's limit allows."""
    layer = layer_of(layout)
    removed = [0] * len(layout)
    for i in range(layout.d):
        removed[layer[i]] += not bool(mask[i])
    limit = [max(min(exact_floor(max_layer_sparsity, n), n - min_keep), 0) for n in layout.sizes]
    need = round(sparsity * layout.d) - sum(removed)
    out = mask.clone()
    for i in sorted((i for i in range(layout.d) if mask[i]), key=lambda i: (float(scores[i]), i)):
        if need <= 0:
            break
        if removed[layer[i]] < limit[layer[i]]:
            out[i] = False
            removed[layer[i]] += 1
            need -= 1
    return out


def ref_per_group(scores, alive, groups, targets):
    """In each group (a list of unit indices), remove the lowest kept until ``targets[g]``."""
    out = alive.clone()
    for members, target in zip(groups, targets, strict=True):
        kept = sorted((i for i in members if alive[i]), key=lambda i: (float(scores[i]), i))
        need = max(target - (len(members) - len(kept)), 0)
        for i in kept[:need]:
            out[i] = False
    return out


def ref_layerwise(scores, mask, layer_sparsity, layout, min_keep=1):
    groups = [list(range(layout.offsets[k], layout.offsets[k + 1])) for k in range(len(layout))]
    targets = [
        min(round(s * n), n - min_keep) for s, n in zip(layer_sparsity, layout.sizes, strict=True)
    ]
    return ref_per_group(scores, mask, groups, targets)


def nm_groups_by_loops(layout, m):
    """Flat indices of each N:M group, built element by element from the tensor shapes."""
    groups = []
    for shape, offset in zip(layout.shapes, layout.offsets, strict=False):
        out, inp = shape[0], shape[1]
        rest = math.prod(shape[2:])
        for o in range(out):
            for k in range(inp // m):
                for r in range(rest):
                    groups.append([offset + (o * inp + k * m + t) * rest + r for t in range(m)])
    return groups


def ref_channel(scores, mask, sparsity, layout, scope="global", min_channels=1):
    channel = layout.channel_index().tolist()
    n_channels = sum(layout.channels)
    alive = torch.zeros(n_channels, dtype=torch.bool)
    for i in range(layout.d):
        alive[channel[i]] |= bool(mask[i])
    owner = layout.channel_param_index().tolist()
    if scope == "layerwise":
        starts = [0, *torch.cumsum(torch.tensor(layout.channels), 0).tolist()]
        groups = [list(range(starts[k], starts[k + 1])) for k in range(len(layout))]
        targets = [min(round(sparsity * c), c - min_channels) for c in layout.channels]
        new_alive = ref_per_group(scores, alive, groups, targets)
    else:
        kept = [0] * len(layout)
        for c in range(n_channels):
            kept[owner[c]] += bool(alive[c])
        need = round(sparsity * n_channels) - int((~alive).sum())
        new_alive = alive.clone()
        order = sorted(
            (c for c in range(n_channels) if alive[c]), key=lambda c: (float(scores[c]), c)
        )
        for c in order:
            if need <= 0:
                break
            if kept[owner[c]] > min_channels:
                new_alive[c] = False
                kept[owner[c]] -= 1
                need -= 1
    return mask & new_alive[torch.tensor(channel)]


# --------------------------------------------------------------------------------------------
# Strategies (bounded sizes: at most 3 layers of at most ~100 weights)
# --------------------------------------------------------------------------------------------
linear_shapes = st.tuples(st.integers(1, 5), st.integers(1, 6))
conv_shapes = st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(1, 2))
layouts = st.lists(st.one_of(linear_shapes, conv_shapes), min_size=1, max_size=3).map(
    lambda shapes: make_layout(*shapes)
)


def nm_layouts(m: int) -> st.SearchStrategy[curvprune.ParamLayout]:
    linear = st.tuples(st.integers(1, 3), st.integers(1, 3).map(lambda k: k * m))
    conv = st.tuples(
        st.integers(1, 2),
        st.integers(1, 2).map(lambda k: k * m),
        st.integers(1, 2),
        st.integers(1, 2),
    )
    return st.lists(st.one_of(linear, conv), min_size=1, max_size=2).map(
        lambda shapes: make_layout(*shapes)
    )


@st.composite
def scores_and_mask(draw, layout, units=None):
    """Integer-valued scores (many ties) over ``units``; a dense or random keep-mask."""
    units = layout.d if units is None else units
    scores = torch.tensor(
        draw(st.lists(st.integers(0, 4), min_size=units, max_size=units)), dtype=torch.float32
    )
    if draw(st.booleans()):
        return scores, dense_mask(layout)
    keep = draw(st.lists(st.booleans(), min_size=layout.d, max_size=layout.d))
    return scores, torch.tensor(keep, dtype=torch.bool)


sparsities = st.integers(0, 19).map(lambda k: k / 20)


# --------------------------------------------------------------------------------------------
# Registration and options
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "cls"),
    [
        ("global", {"max_layer_sparsity": 0.8, "min_keep": 2}, GlobalMask),
        ("layerwise", {"overrides": {"re:fc.*": 0.2}}, LayerwiseMask),
        ("nm", {"n_m": "2:4"}, NMMask),
        ("channel", {"scope": "layerwise", "min_channels": 2}, ChannelMask),
    ],
)
def test_registered_by_name(name, options, cls):
    applier = create("mask", name, **options)
    assert type(applier) is cls
    for key, value in options.items():
        assert getattr(applier.config, key) == value


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("global", {"max_layer_sparsity": 0.0}, "max_layer_sparsity"),
        ("global", {"max_layer_sparsity": 1.5}, "max_layer_sparsity"),
        ("global", {"min_keep": -1}, "min_keep"),
        ("layerwise", {"min_keep": -2}, "min_keep"),
        ("layerwise", {"overrides": {"fc.weight": 1.0}}, "overrides"),
        ("layerwise", {"overrides": {"re:fc(": 0.5}}, "overrides"),
        ("nm", {"n_m": "4:2"}, "n_m"),
        ("nm", {"n_m": "0:4"}, "n_m"),
        ("nm", {"n_m": "2-4"}, "n_m"),
        ("channel", {"scope": "everywhere"}, "scope"),
        ("channel", {"min_channels": -1}, "min_channels"),
        ("global", {"min_kep": 1}, "min_kep"),
    ],
)
def test_bad_options_name_the_field(name, options, field):
    with pytest.raises(curvprune.ConfigError, match=field):
        create("mask", name, **options)


def test_nm_config_parses_n_and_m():
    config = create("mask", "nm", n_m="1:3").config
    assert (config.n, config.m) == (1, 3)


# --------------------------------------------------------------------------------------------
# The primitive
# --------------------------------------------------------------------------------------------
def test_rank_within_groups_breaks_ties_by_position():
    scores = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0, 3.0])
    group = torch.tensor([0, 1, 0, 1, 0, 1])
    # group 0 holds positions 0, 2, 4 with scores 2, 1, 1; group 1 holds 1, 3, 5 with 1, 0, 3.
    assert rank_within_groups(scores, group, 2).tolist() == [2, 1, 0, 0, 1, 2]


def test_prune_lowest_global_total_respects_quotas():
    scores = torch.tensor([0.0, 1.0, 2.0, 3.0, 0.5, 0.6])
    alive = torch.tensor([True, True, True, True, True, False])
    group = torch.tensor([0, 0, 0, 0, 1, 1])
    out = prune_lowest(scores, alive, group, torch.tensor([1, 5]), torch.tensor(3))
    # Group 0 may lose one weight (index 0); then 4 (group 1); index 5 is already dead.
    assert out.tolist() == [False, True, True, True, False, False]


# --------------------------------------------------------------------------------------------
# global
# --------------------------------------------------------------------------------------------
@given(
    layout=layouts,
    data=st.data(),
    sparsity=sparsities,
    cap=st.integers(1, 20).map(lambda k: k / 20),
    min_keep=st.integers(0, 3),
)
def test_global_matches_reference(layout, data, sparsity, cap, min_keep):
    scores, mask = data.draw(scores_and_mask(layout))
    applier = create("mask", "global", max_layer_sparsity=cap, min_keep=min_keep)
    new = applier.select(scores, mask, sparsity, layout)
    assert not (new & ~mask).any()
    assert torch.equal(new, ref_global(scores, mask, sparsity, layout, cap, min_keep))


@given(layout=layouts, data=st.data(), sparsity=sparsities)
def test_global_count_is_exact_without_limits(layout, data, sparsity):
    scores, mask = data.draw(scores_and_mask(layout))
    new = create("mask", "global", min_keep=0).select(scores, mask, sparsity, layout)
    expected = max(round(sparsity * layout.d), int((~mask).sum()))
    assert int((~new).sum()) == expected


def test_global_successive_calls_never_revive():
    layout = make_layout((6, 8), (4, 3, 2, 2))
    applier = create("mask", "global")
    mask = dense_mask(layout)
    generator = torch.Generator().manual_seed(0)
    for sparsity in (0.2, 0.5, 0.5, 0.8, 0.9):
        new = applier.select(torch.randn(layout.d, generator=generator), mask, sparsity, layout)
        assert not (new & ~mask).any()
        assert int((~new).sum()) == round(sparsity * layout.d)
        assert applier.achieved_sparsity(new, layout) == pytest.approx(
            round(sparsity * layout.d) / layout.d, abs=1e-7
        )
        mask = new


def test_global_ties_break_by_flat_index():
    layout = make_layout((4, 5), (3, 5))
    new = create("mask", "global", min_keep=0).select(
        torch.zeros(layout.d), dense_mask(layout), 0.6, layout
    )
    assert (~new).nonzero().squeeze(1).tolist() == list(range(21))


def test_global_ignores_scores_of_pruned_weights():
    layout = make_layout((5, 6))
    mask = torch.arange(layout.d) % 3 != 0
    scores = torch.randn(layout.d, generator=torch.Generator().manual_seed(1))
    other = torch.where(mask, scores, torch.full_like(scores, -1e9))
    applier = create("mask", "global")
    assert torch.equal(
        applier.select(scores, mask, 0.6, layout), applier.select(other, mask, 0.6, layout)
    )


def test_global_prefers_the_low_scored_layer():
    layout = make_layout((10, 10), (10, 10))
    generator = torch.Generator().manual_seed(2)
    scores = torch.rand(layout.d, generator=generator)
    scores[100:] *= 10  # the second layer matters ten times more
    new = create("mask", "global").select(scores, dense_mask(layout), 0.5, layout)
    removed = (~new).view(2, 100).sum(1)
    assert removed[0] > removed[1]
    assert int(removed.sum()) == 100


def test_global_layer_cap_and_unreachable_target():
    layout = make_layout((10, 10), (10, 10))
    scores = torch.cat([torch.zeros(100), torch.ones(100)])
    applier = create("mask", "global", max_layer_sparsity=0.6)
    new = applier.select(scores, dense_mask(layout), 0.5, layout)
    removed = (~new).view(2, 100).sum(1).tolist()
    assert removed == [60, 40]  # the cap moves 40 removals onto the costly layer
    # 0.9 is unreachable under a 0.6 cap: prune all that is allowed, without raising.
    new = applier.select(scores, new, 0.9, layout)
    assert (~new).view(2, 100).sum(1).tolist() == [60, 60]
    assert applier.achieved_sparsity(new, layout) == pytest.approx(0.6)


@pytest.mark.parametrize(("cap", "rows", "expected"), [(0.57, 10, 57), (0.7, 9, 63)])
def test_global_cap_reads_the_decimal_exactly(cap, rows, expected):
    # In float64, 0.57 * 100 = 56.99999999999999 and 0.7 * 90 = 62.99999999999999.
    layout = make_layout((rows, 10), (10, 10))
    scores = torch.cat([torch.zeros(rows * 10), torch.ones(100)])
    new = create("mask", "global", max_layer_sparsity=cap).select(
        scores, dense_mask(layout), 0.5, layout
    )
    assert int((~new[: rows * 10]).sum()) == expected


def test_global_min_keep():
    layout = make_layout((2, 3), (4, 10))
    scores = torch.cat([torch.zeros(6), torch.ones(40)])
    new = create("mask", "global", min_keep=2).select(scores, dense_mask(layout), 0.5, layout)
    assert (~new).tolist()[:6].count(True) == 4
    assert int((~new).sum()) == 23


def test_global_respects_an_earlier_excess():
    layout = make_layout((10, 10), (10, 10))
    mask = dense_mask(layout)
    mask[:50] = False  # layer 0 already at 50 %, above the cap of 30 %
    new = create("mask", "global", max_layer_sparsity=0.3).select(
        torch.zeros(layout.d), mask, 0.6, layout
    )
    assert (~new).view(2, 100).sum(1).tolist() == [50, 30]


def test_global_with_select_parameters_on_a_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 5))
    layout = curvprune.select_parameters(model)
    weights = layout.gather(model)
    new = create("mask", "global").select(weights.abs(), dense_mask(layout), 0.75, layout)
    assert int((~new).sum()) == round(0.75 * layout.d)
    threshold = weights.abs()[~new].max()
    assert bool((weights.abs()[new] >= threshold).all())


# --------------------------------------------------------------------------------------------
# layerwise
# --------------------------------------------------------------------------------------------
@given(layout=layouts, data=st.data(), sparsity=sparsities, min_keep=st.integers(0, 3))
def test_layerwise_matches_reference(layout, data, sparsity, min_keep):
    scores, mask = data.draw(scores_and_mask(layout))
    new = create("mask", "layerwise", min_keep=min_keep).select(scores, mask, sparsity, layout)
    assert not (new & ~mask).any()
    expected = ref_layerwise(scores, mask, [sparsity] * len(layout), layout, min_keep)
    assert torch.equal(new, expected)


def test_layerwise_equal_sparsity_per_layer():
    layout = make_layout((10, 10), (5, 4, 2, 5), (20, 5))
    scores = torch.randn(layout.d, generator=torch.Generator().manual_seed(3))
    scores[:100] -= 100  # global ranking would empty layer 0 first; layerwise must not
    masks = curvprune.MaskSet(
        layout, create("mask", "layerwise").select(scores, dense_mask(layout), 0.7, layout)
    )
    assert all(s == pytest.approx(0.7) for s in masks.per_layer_sparsity().values())


def test_layerwise_overrides_exact_name_and_regex():
    model = nn.Sequential(
        nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 4)
    )
    layout = curvprune.select_parameters(model)
    applier = create("mask", "layerwise", overrides={"0.weight": 0.2, "re:4\\.w.*": 0.5})
    assert applier.layer_sparsities(0.8, layout) == [0.2, 0.8, 0.5]
    new = applier.select(torch.randn(layout.d), dense_mask(layout), 0.8, layout)
    per_layer = curvprune.MaskSet(layout, new).per_layer_sparsity()
    assert per_layer == pytest.approx({"0.weight": 0.2, "2.weight": 0.8, "4.weight": 0.5})


def test_layerwise_override_matching_nothing_is_an_error():
    layout = make_layout((4, 4), (4, 4))
    applier = create("mask", "layerwise", overrides={"layer0.wieght": 0.5})
    with pytest.raises(curvprune.ConfigError, match="layer0.wieght.*did you mean 'layer0.weight'"):
        applier.select(torch.zeros(layout.d), dense_mask(layout), 0.5, layout)


def test_layerwise_overlapping_overrides_are_an_error():
    layout = make_layout((4, 4), (4, 4))
    applier = create("mask", "layerwise", overrides={"re:layer.*": 0.5, "layer1.weight": 0.1})
    with pytest.raises(curvprune.ConfigError, match="'layer1.weight' matches two"):
        applier.select(torch.zeros(layout.d), dense_mask(layout), 0.5, layout)


def test_layerwise_min_keep():
    layout = make_layout((1, 3), (4, 4))
    new = create("mask", "layerwise", min_keep=2).select(
        torch.zeros(layout.d), dense_mask(layout), 0.9, layout
    )
    # layer 0: round(2.7) = 3 capped at 3 - 2 = 1; layer 1: round(14.4) = 14.
    assert (~new[:3]).sum() == 1 and (~new[3:]).sum() == 14


# --------------------------------------------------------------------------------------------
# nm
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_m", ["2:4", "1:4", "3:8", "1:2"])
@given(data=st.data())
def test_nm_matches_reference_at_the_final_level(n_m, data):
    applier = create("mask", "nm", n_m=n_m)
    n, m = applier.config.n, applier.config.m
    layout = data.draw(nm_layouts(m))
    scores, _ = data.draw(scores_and_mask(layout))
    new = applier.select(scores, dense_mask(layout), (m - n) / m, layout)
    groups = nm_groups_by_loops(layout, m)
    kept = new[torch.tensor(groups)]
    assert bool((kept.sum(1) == n).all())  # exactly N kept in every group
    assert torch.equal(
        new, ref_per_group(scores, dense_mask(layout), groups, [m - n] * len(groups))
    )


@given(data=st.data(), level=st.sampled_from([0.0, 0.125, 0.25, 0.375, 0.5]))
def test_nm_intermediate_levels_from_any_mask(data, level):
    applier = create("mask", "nm", n_m="4:8")
    layout = data.draw(nm_layouts(8))
    scores, mask = data.draw(scores_and_mask(layout))
    new = applier.select(scores, mask, level, layout)
    groups = nm_groups_by_loops(layout, 8)
    assert not (new & ~mask).any()
    assert torch.equal(new, ref_per_group(scores, mask, groups, [round(level * 8)] * len(groups)))


def test_nm_groups_run_along_input_channels_of_a_conv():
    layout = make_layout((2, 4, 3, 3))
    applier = create("mask", "nm", n_m="2:4")
    groups = applier.groups(layout)
    weight_ids = torch.arange(layout.d).view(2, 4, 3, 3)
    assert groups.shape == (2 * 3 * 3, 4)
    assert groups[0].tolist() == weight_ids[0, :, 0, 0].tolist()
    assert groups[4].tolist() == weight_ids[0, :, 1, 1].tolist()
    # Scores decrease with the input channel: the two highest channels go in every group.
    scores = (4 - torch.arange(4.0)).view(1, 4, 1, 1).expand(2, 4, 3, 3).reshape(-1)
    new = applier.select(scores, dense_mask(layout), 0.5, layout).view(2, 4, 3, 3)
    assert bool(new[:, :2].all()) and not bool(new[:, 2:].any())


def test_nm_successive_levels_reach_the_pattern():
    layout = make_layout((3, 8), (2, 4, 1, 2))
    applier = create("mask", "nm", n_m="1:4")
    mask = dense_mask(layout)
    generator = torch.Generator().manual_seed(4)
    groups = applier.groups(layout)
    for level, pruned_per_group in ((0.25, 1), (0.5, 2), (0.75, 3)):
        new = applier.select(torch.randn(layout.d, generator=generator), mask, level, layout)
        assert not (new & ~mask).any()
        assert bool(((~new)[groups].sum(1) == pruned_per_group).all())
        mask = new


def test_nm_indivisible_input_dim_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    layout = curvprune.select_parameters(model)
    with pytest.raises(curvprune.ConfigError, match=r"'2\.weight' \(shape \[2, 6\]\).*6"):
        create("mask", "nm", n_m="2:4").select(
            torch.zeros(layout.d), dense_mask(layout), 0.5, layout
        )


def test_nm_refuses_a_level_beyond_the_pattern():
    layout = make_layout((2, 4))
    with pytest.raises(ValueError, match="at most 2 of every 4"):
        create("mask", "nm").select(torch.zeros(8), dense_mask(layout), 0.7, layout)


def test_nm_check_pipeline_sparsity():
    applier = create("mask", "nm", n_m="2:4")
    scorer = create("scorer", "magnitude")
    reason = applier.check_pipeline({"scorer": scorer, "prune": PruneConfig(sparsity=0.9)})
    assert reason is not None
    assert "set prune.sparsity = 0.5" in reason and "got 0.9" in reason
    assert applier.check_pipeline({"scorer": scorer, "prune": PruneConfig(sparsity=0.5)}) is None
    one_third = create("mask", "nm", n_m="1:3")
    assert (
        one_third.check_pipeline({"scorer": scorer, "prune": PruneConfig(sparsity=2 / 3)}) is None
    )


# --------------------------------------------------------------------------------------------
# channel
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@given(layout=layouts, data=st.data(), sparsity=sparsities, min_channels=st.integers(0, 2))
def test_channel_matches_reference(scope, layout, data, sparsity, min_channels):
    n_channels = sum(layout.channels)
    scores, mask = data.draw(scores_and_mask(layout, n_channels))
    applier = create("mask", "channel", scope=scope, min_channels=min_channels)
    new = applier.select(scores, mask, sparsity, layout)
    assert not (new & ~mask).any()
    assert torch.equal(new, ref_channel(scores, mask, sparsity, layout, scope, min_channels))
    # Whole channels: every channel is either untouched or fully removed.
    channel = layout.channel_index()
    lost = torch.zeros(n_channels, dtype=torch.long).index_add_(0, channel, (mask & ~new).long())
    gone = torch.zeros(n_channels, dtype=torch.long).index_add_(0, channel, new.long()) == 0
    assert bool(gone[lost > 0].all())


def test_channel_removes_whole_channels_and_counts_in_channels():
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6, 4))
    layout = curvprune.select_parameters(model)
    scores = torch.tensor([5.0, 0.0, 4.0, 1.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0])
    applier = create("mask", "channel")
    new = applier.select(scores, dense_mask(layout), 0.3, layout)
    conv, linear = layout.unflatten(new)
    assert [bool(conv[c].any()) for c in range(6)] == [True, False, True, False, True, False]
    assert bool(conv[[0, 2, 4]].all()) and bool(linear.all())
    assert applier.achieved_sparsity(new, layout) == pytest.approx(0.3)
    new = applier.select(scores, new, 0.4, layout)
    assert applier.achieved_sparsity(new, layout) == pytest.approx(0.4)


def test_channel_global_vs_layerwise():
    layout = make_layout((8, 3), (8, 3))
    scores = torch.cat([torch.arange(8.0), torch.arange(8.0) + 100])
    kept = {}
    for scope in ("global", "layerwise"):
        applier = create("mask", "channel", scope=scope)
        new = applier.select(scores, dense_mask(layout), 0.5, layout)
        kept[scope] = ChannelMask.alive_channels(new, layout).view(2, 8).sum(1).tolist()
    assert kept["global"] == [1, 7]  # min_channels = 1 stops layer 0 at one channel
    assert kept["layerwise"] == [4, 4]


def test_a_global_ranking_that_empties_a_layer_warns_and_layerwise_does_not(recwarn):
    layout = make_layout((16, 3), (16, 3))
    scores = torch.cat([torch.arange(16.0), torch.arange(16.0) + 100])
    with pytest.warns(curvprune.ChannelCollapseWarning, match=r"keeps 10 % or less of 1 "
                                                              r"group\(s\) \(group 0: 1 of 16\)"):
        create("mask", "channel").select(scores, dense_mask(layout), 0.5, layout)
    recwarn.clear()
    create("mask", "channel", scope="layerwise").select(scores, dense_mask(layout), 0.5, layout)
    assert not [w for w in recwarn if issubclass(w.category, curvprune.ChannelCollapseWarning)]


def test_channel_min_channels():
    layout = make_layout((4, 2), (6, 2))
    applier = create("mask", "channel", min_channels=3)
    new = applier.select(torch.zeros(10), dense_mask(layout), 0.9, layout)
    assert ChannelMask.alive_channels(new, layout).view(-1).tolist() == [False] + [True] * 3 + [
        False,
        False,
        False,
        True,
        True,
        True,
    ]


# --------------------------------------------------------------------------------------------
# Granularity checks and argument errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["global", "layerwise", "nm"])
def test_weight_appliers_refuse_channel_scorers(name):
    options = {"prune": {"sparsity": 0.5}, "mask": {"name": name},
               "scorer": {"name": "magnitude", "granularity": "channel"}}
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(options, host=get_plugin_manager(autoload=False))
    assert len(info.value.errors) == 1, info.value.errors
    reason = info.value.errors[0]
    assert "scores channels" in reason and f"mask {name!r} prunes single weights" in reason
    assert "('channel')" in reason and reason.endswith("@ mask.name")
    options["scorer"] = {"name": "magnitude"}
    Pipeline.from_config(options, host=get_plugin_manager(autoload=False))


def test_channel_applier_refuses_weight_scorers():
    options = {"mask": {"name": "channel"}, "scorer": {"name": "obs"},
               "estimator": {"name": "dense"}}
    with pytest.raises(ConfigError) as info:
        Pipeline.from_config(options, host=get_plugin_manager(autoload=False))
    assert len(info.value.errors) == 1, info.value.errors
    assert "scores single weights" in info.value.errors[0] and "'channel'" in info.value.errors[0]
    options["scorer"] = {"name": "magnitude", "granularity": "channel"}
    options.pop("estimator")
    Pipeline.from_config(options, host=get_plugin_manager(autoload=False))


@pytest.mark.parametrize("name", ["global", "layerwise", "nm", "channel"])
def test_select_rejects_bad_arguments(name):
    layout = make_layout((4, 4))
    applier = create("mask", name)
    units = layout.d if name != "channel" else 4
    with pytest.raises(ValueError, match="needs one score per"):
        applier.select(torch.zeros(units + 1), dense_mask(layout), 0.5, layout)
    with pytest.raises(ValueError, match="keep-mask must be bool"):
        applier.select(torch.zeros(units), torch.ones(layout.d), 0.5, layout)
    with pytest.raises(ValueError, match="sparsity must be in"):
        applier.select(torch.zeros(units), dense_mask(layout), 1.0, layout)


@pytest.mark.parametrize("name", ["global", "layerwise", "nm", "channel"])
def test_nan_scores_of_kept_units_raise_naming_the_layer(name):
    layout = make_layout((4, 4), (4, 8))
    applier = create("mask", name)
    units = layout.d if name != "channel" else 8
    scores = torch.zeros(units)
    scores[-1] = float("nan")
    with pytest.raises(curvprune.NumericalError, match="'layer1.weight'"):
        applier.select(scores, dense_mask(layout), 0.5, layout)
    if name != "channel":  # a NaN score of a weight already removed is never read
        mask = dense_mask(layout)
        mask[-1] = False
        applier.select(scores, mask, 0.5, layout)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("global", {"max_layer_sparsity": 0.7}),
        ("layerwise", {}),
        ("nm", {}),
        ("channel", {"scope": "global"}),
    ],
)
def test_same_masks_on_cuda(name, options):
    layout = make_layout((16, 32), (8, 16, 3, 3))
    applier = create("mask", name, **options)
    units = layout.d if name != "channel" else sum(layout.channels)
    generator = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 5, (units,), generator=generator).float()  # many ties
    mask = torch.rand(layout.d, generator=generator) > 0.2
    on_cpu = applier.select(scores, mask, 0.5, layout)
    on_gpu = applier.select(scores.cuda(), mask.cuda(), 0.5, layout)
    assert on_gpu.device.type == "cuda"
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_rank_alive_in_rows_puts_dead_entries_last():
    scores = torch.tensor([[3.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    alive = torch.tensor([[True, True, True, False], [False, True, True, True]])
    assert rank_alive_in_rows(scores, alive).tolist() == [[2, 0, 1, 3], [3, 0, 1, 2]]


# --------------------------------------------------------------------------------------------
# channel, with traced structures (coupled residual channels, unprunable classifier)
# --------------------------------------------------------------------------------------------
def _structured_layouts():
    from curvprune.testing.nets import TinyResNet, sequential_cnn

    out = []
    for model in (TinyResNet("basic", (2, 3), 2, 2), TinyResNet("bottleneck", (1, 2), 1, 3),
                  sequential_cnn([2, 3], [2])):
        layout = curvprune.select_parameters(model)
        graph = curvprune.StructureGraph.trace(model)
        out.append(layout.with_structures(graph.structures(layout)))
    return out


STRUCTURED = _structured_layouts()


def ref_structure_mask(scores, mask, sparsity, layout, scope, min_channels):
    """The channel mask over structures, by loops: alive structures, then greedy removal."""
    sid = layout.structure_index().tolist()
    channel = layout.channel_index().tolist()
    group = layout.structure_group().tolist()
    n, n_groups = layout.n_structures, len(layout.structures.groups)
    alive = [False] * n
    for i in range(layout.d):
        if mask[i] and sid[channel[i]] >= 0:
            alive[sid[channel[i]]] = True
    size = [group.count(g) for g in range(n_groups)]
    kept = [sum(alive[s] for s in range(n) if group[s] == g) for g in range(n_groups)]
    order = sorted((s for s in range(n) if alive[s]), key=lambda s: (float(scores[s]), s))
    new_alive = list(alive)
    if scope == "global":
        need = round(sparsity * n) - (n - sum(alive))
        for s in order:
            if need <= 0:
                break
            if kept[group[s]] > min_channels:
                new_alive[s] = False
                kept[group[s]] -= 1
                need -= 1
    else:
        for g in range(n_groups):
            target = min(round(sparsity * size[g]), size[g] - min_channels)
            more = target - (size[g] - kept[g])
            for s in (s for s in order if group[s] == g):
                if more <= 0:
                    break
                new_alive[s] = False
                more -= 1
    return torch.tensor([bool(mask[i]) and (sid[channel[i]] < 0 or new_alive[sid[channel[i]]])
                         for i in range(layout.d)])


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@given(which=st.integers(0, len(STRUCTURED) - 1), data=st.data(), sparsity=sparsities,
       min_channels=st.integers(0, 2))
def test_channel_with_structures_matches_reference(scope, which, data, sparsity, min_channels):
    layout = STRUCTURED[which]
    n = layout.n_structures
    scores = torch.tensor(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)),
                          dtype=torch.float32)
    sid = layout.structure_index()
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], torch.ones_like(keep[:1]))
    mask = per_channel[layout.channel_index()]
    applier = create("mask", "channel", scope=scope, min_channels=min_channels)
    new = applier.select(scores, mask, sparsity, layout)
    expected = ref_structure_mask(scores, mask, sparsity, layout, scope, min_channels)
    assert torch.equal(new, expected)


def test_nm_groups_of_a_conv1d_run_along_its_input_dimension():
    """transformers' Conv1D stores W as [in, out]: a group is M consecutive *inputs* of one
    output, the same weights as the equivalent Linear's group (W.T)."""
    layout = ParamLayout(("c.weight",), (torch.Size([8, 3]),), ("Conv1D",))
    groups = NMMask().groups(layout)
    index = torch.arange(24).view(8, 3)  # flat position of W[i, o]
    expected = index.t().reshape(6, 4)  # output o, inputs 4k..4k+3
    assert sorted(map(tuple, groups.tolist())) == sorted(map(tuple, expected.tolist()))
