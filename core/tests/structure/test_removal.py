"""Physical removal of channel structures: the smaller model computes what the masked one did.

Ground truths: the masked model (structure weights, biases and BN γ, β zeroed through
:class:`curvprune.MaskSet`) in float64, and, for parameter counts, the same architecture built
directly at the kept widths. Removal only drops exact zeros from sums, but a convolution with
fewer input channels may add the remaining terms in another order, so outputs are compared at
1e-12 relative to their scale (float64 round-off of sums of ~100 terms is ~1e-14).
"""

from __future__ import annotations

import copy

import pytest
import torch
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
    apply_removal,
    count_flops_params,
    remove_structures,
    select_parameters,
)
from curvprune.structure.counting import count_params
from curvprune.testing.nets import PadShortcutNet, SplitNet, TinyResNet, randomize_, sequential_cnn

HOST = curvprune.get_plugin_manager(autoload=False)


def structured(model: nn.Module):
    layout = select_parameters(model)
    return layout.with_structures(StructureGraph.trace(model).structures(layout))


def masked_copy(model: nn.Module, layout, keep: torch.Tensor) -> nn.Module:
    sid = layout.structure_index()
    never = torch.ones_like(sid, dtype=torch.bool)
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], never)
    twin = copy.deepcopy(model)
    masks = MaskSet(layout, per_channel[layout.channel_index()])
    masks.with_extra(layout.structures.gate_masks(keep)).apply_(twin)
    return twin


def draw_keep(data, layout, label="keep") -> torch.Tensor:
    """A structure keep-mask with at least one kept structure per group."""
    s = layout.structures
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=layout.n_structures,
                                           max_size=layout.n_structures), label=label))
    for i in range(len(s.groups)):
        piece = keep[s.group_slice(i)]
        if not piece.any():
            piece[data.draw(st.integers(0, piece.numel() - 1), label="rescued")] = True
    return keep


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= 1e-12 * scale


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in now)


# --------------------------------------------------------------------------------------------
# Equivalence: masked == removed
# --------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    data=st.data(),
    widths=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    hidden=st.lists(st.integers(1, 4), max_size=2),
    pool=st.booleans(),
    bias=st.booleans(),
)
def test_sequential_cnn_removed_equals_masked(data, widths, hidden, pool, bias):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(sequential_cnn(widths, hidden, pool=pool, bias=bias).double(), gen).eval()
    layout = structured(model)
    keep = draw_keep(data, layout)
    x = torch.randn(3, 1, 4, 4, generator=gen, dtype=torch.float64)
    expected = masked_copy(model, layout, keep)(x)
    result = remove_structures(model, layout.structures, keep, example_input=x)
    assert_close(model(x), expected)
    # the parameter count of the same architecture built at the kept widths
    kept = [int(keep[layout.structures.group_slice(i)].sum()) for i in range(len(widths + hidden))]
    smaller = sequential_cnn(kept[: len(widths)], kept[len(widths):], pool=pool, bias=bias)
    assert result.params_after == count_params(smaller) == count_params(model)
    assert [p.shape for p in model.parameters()] == [p.shape for p in smaller.parameters()]
    assert result.flops_after == count_flops_params(smaller.double(), x)[0]
    assert result.params_before >= result.params_after


@settings(max_examples=8, deadline=None)
@given(data=st.data(), block=st.sampled_from(["basic", "bottleneck"]),
       widths=st.lists(st.integers(1, 3), min_size=1, max_size=2), blocks=st.integers(1, 2),
       stem=st.integers(1, 4))
def test_resnet_removed_equals_masked(data, block, widths, blocks, stem):
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    model = randomize_(TinyResNet(block, widths, blocks, stem).double(), gen).eval()
    layout = structured(model)
    keep = draw_keep(data, layout)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64)
    expected = masked_copy(model, layout, keep)(x)
    result = remove_structures(model, layout.structures, keep, example_input=x)
    assert_close(model(x), expected)
    removed = int((~keep).sum())
    assert (result.params_after < result.params_before) == (removed > 0)
    assert result.params_after == count_params(model)
    # the fresh architecture rebuilt from the kept indices loads the removed model's weights
    fresh = TinyResNet(block, widths, blocks, stem).double().eval()
    apply_removal(fresh, result.kept_indices)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.slow
def test_torchvision_resnet18_removed_equals_masked():
    torchvision = pytest.importorskip("torchvision")
    gen = torch.Generator().manual_seed(0)
    model = randomize_(torchvision.models.resnet18(num_classes=10).double(), gen).eval()
    layout = structured(model)
    keep = torch.rand(layout.n_structures, generator=gen) > 0.5
    for i in range(len(layout.structures.groups)):
        keep[layout.structures.offsets[i]] = True
    x = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    expected = masked_copy(model, layout, keep)(x)
    result = remove_structures(model, layout.structures, keep, example_input=x)
    assert_close(model(x), expected)
    assert model.layer1[0].conv1.in_channels == model.conv1.out_channels == int(keep[:64].sum())
    assert result.flops_after < result.flops_before and result.params_after == count_params(model)


def test_removing_nothing_is_the_identity():
    gen = torch.Generator().manual_seed(2)
    model = randomize_(TinyResNet("basic", (2, 3), 1, 2).double(), gen)
    layout = structured(model)
    before, params = state(model), list(model.parameters())
    everything = torch.ones(layout.n_structures, dtype=torch.bool)
    result = remove_structures(model, layout.structures, everything)
    assert same_state(model, before) and all(a is b for a, b in zip(params, model.parameters()))
    assert result.kept_indices == {} and result.params_after == result.params_before
    assert set(result.layer_ratios.values()) == {0.0}


def test_classifier_is_never_removed():
    model = sequential_cnn([2], [3], classes=4)
    layout = structured(model)
    assert all(g.name != "6" for g in layout.structures.groups)
    keep = torch.tensor([True, False, True, False, True])
    remove_structures(model, layout.structures, keep)
    assert model[6].out_features == 4 and model[6].in_features == 2


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, model untouched
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("net", "group", "match"),
    [(PadShortcutNet, "conv1", r"cannot remove channels of group 'conv1': getitem at node "
                               r"'getitem' is not handled.*@ model"),
     (SplitNet, "a", r"cannot remove channels of group 'a': split at node 'split' has "
                     r"literal sizes \[4, 4\] that a removal would leave stale")],
)
def test_unsupported_graphs_are_refused_by_name(net, group, match):
    model = net()
    before = state(model)
    g = StructureGraph.trace(model).group(group)
    with pytest.raises(UnsupportedModelError, match=match):
        apply_removal(model, {group: list(range(g.size - 1))})
    assert same_state(model, before)


def test_emptying_a_group_is_refused_before_any_change():
    model = TinyResNet("basic", (2, 2), 1, 2)
    layout = structured(model)
    keep = torch.ones(layout.n_structures, dtype=torch.bool)
    keep[layout.structures.group_slice(1)] = False  # an internal group loses everything
    keep[0] = False  # and the stream loses one channel, which would be fine alone
    before = state(model)
    with pytest.raises(ConfigError, match=r"leave group 'layers.0.0.conv1' .* no channel"):
        remove_structures(model, layout.structures, keep)
    assert same_state(model, before)
    with pytest.raises(ConfigError, match=r"keep must be bool"):
        remove_structures(model, layout.structures, keep.long())


def test_bad_kept_indices_are_refused():
    model = sequential_cnn([3])
    for bad, match in [({"nope": [0]}, r"no channel group 'nope'"),
                       ({"0": [2, 1]}, r"ascending, distinct and in \[0, 3\)"),
                       ({"0": [3]}, r"ascending"),
                       ({"4": [0]}, r"cannot remove channels of group '4': its channels reach")]:
        with pytest.raises(ConfigError, match=match):
            apply_removal(model, bad)


def test_batchnorm_without_affine_cannot_be_removed():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8, 2))
    before = state(model)
    with pytest.raises(UnsupportedModelError, match=r"BatchNorm '1' has no affine parameters"):
        apply_removal(model, {"0": [1]})
    assert same_state(model, before)


# --------------------------------------------------------------------------------------------
# Counting and the pipeline
# --------------------------------------------------------------------------------------------
def test_count_flops_params_by_hand():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 4, 3, groups=2),
                          nn.Flatten(), nn.Linear(16, 3))
    flops, params = count_flops_params(model, torch.randn(5, 1, 4, 4))
    # conv 1: 2·(9·1·2·16); conv 2 (groups 2, 2x2 output): 2·(9·2/2·4·4); linear: 2·16·3
    assert flops == 2 * (9 * 2 * 16) + 2 * (9 * 1 * 4 * 4) + 2 * 16 * 3
    assert params == (18 + 2) + (4 * 9 + 4) + (48 + 3)


def test_pipeline_remove_after_prune():
    gen = torch.Generator().manual_seed(4)
    model = randomize_(TinyResNet("bottleneck", (2, 2), 1, 3).double(), gen).eval()
    pipe = Pipeline.from_config({"prune": {"sparsity": 0.5, "loss_samples": 0},
                                 "scorer": {"name": "magnitude", "granularity": "channel"},
                                 "mask": {"name": "channel", "remove": True}}, host=HOST)
    result = pipe.prune(model, None)
    x = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    expected = model(x)
    removal = pipe.remove(model, result.masks, example_input=x)
    assert_close(model(x), expected)
    assert removal.flops_after < removal.flops_before
    total = sum(n for _, n in removal.kept.values())
    assert sum(k for k, _ in removal.kept.values()) == total - round(0.5 * total)


def test_run_removes_before_finetuning_and_reloads(tmp_path):
    import json

    from curvprune.run.execute import execute_run
    from curvprune.run.models import build_model

    config = {
        "model": {"name": "digits-cnn", "kwargs": {"width": 4}},
        "data": {"name": "digits"},
        "train": {"epochs": 0},
        "prune": {"sparsity": 0.5, "loss_samples": 32},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
        "finetune": {"epochs": 1},
        "run": {"device": "cpu", "progress": False},
    }
    outcome = execute_run(config, out=tmp_path, quiet=True, host=HOST)
    s = outcome.result["structure"]
    assert s["kept"] == {"0": [2, 4], "3": [4, 8], "8": [32, 64]}
    assert s["layer_ratios"] == {"0": 0.5, "3": 0.5, "8": 0.5}
    assert s["params_after"] < s["params_before"] and s["flops_after"] < s["flops_before"]
    assert s["max_output_difference"] < 1e-5  # float32 round-off of masked vs removed
    run_dir = outcome.run_dir
    assert (run_dir / "layer_ratios.png").is_file() and "## Channels removed" in (
        run_dir / "report.md").read_text()
    structure = json.loads((run_dir / "structure.json").read_text())
    fresh = build_model("digits-cnn", num_classes=10, width=4)
    apply_removal(fresh, structure)
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    assert fresh[0].out_channels == 2 and fresh[8].in_features == 4 * 16
