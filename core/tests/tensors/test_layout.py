"""Parameter selection, the flat layout and its block partition (curvprune.tensors.layout).

Ground truths are built independently of the code under test: flat vectors by
``torch.cat([p.reshape(-1) ...])``, channel and block membership from per-coordinate keys.
Everything here is integer bookkeeping or copies, so comparisons are exact (``torch.equal``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

from curvprune import BlockLayout, ConfigError, ParamLayout, select_parameters


class TaggedLinear(nn.Linear):
    """A user subclass of Linear: type selectors must pick it up through the MRO."""


class Net(nn.Module):
    """Conv, BatchNorm, a bias-free conv, a Linear subclass and a plain Linear.

    named_parameters() order: features.0.weight, features.0.bias, features.1.weight,
    features.1.bias, features.3.weight, head.weight, head.bias, fc.weight, fc.bias.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 2, 3),
            nn.BatchNorm2d(2),
            nn.ReLU(),
            nn.Conv2d(2, 3, 3, bias=False),
        )
        self.head = TaggedLinear(12, 5)
        self.fc = nn.Linear(5, 4)


def _select(targets, ignore=(), **kwargs) -> tuple[str, ...]:
    return select_parameters(Net(), targets, ignore, **kwargs).names


# -- selection ---------------------------------------------------------------------------------


def test_default_targets_pick_conv_and_linear_weights_including_subclasses():
    layout = select_parameters(Net())
    assert layout.names == ("features.0.weight", "features.3.weight", "head.weight", "fc.weight")
    assert layout.module_types == ("Conv2d", "Conv2d", "TaggedLinear", "Linear")
    assert layout.shapes == (
        torch.Size([2, 1, 3, 3]),
        torch.Size([3, 2, 3, 3]),
        torch.Size([5, 12]),
        torch.Size([4, 5]),
    )


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        # A type name picks the weight of every module of that type or a subclass, never biases.
        (["Linear"], [], ("head.weight", "fc.weight")),
        (["TaggedLinear"], [], ("head.weight",)),
        (["BatchNorm2d"], [], ("features.1.weight",)),
        # Order is named_parameters() order, whatever the order of the selectors.
        (["fc", "head", "features.0"], [], ("features.0.weight", "head.weight", "fc.weight")),
        # Exact module name picks its weight; exact parameter name picks exactly that parameter.
        (["features.3"], [], ("features.3.weight",)),
        (["fc.bias"], [], ("fc.bias",)),
        (["fc.bias", "fc"], [], ("fc.weight", "fc.bias")),
        # "re:" is a full match on parameter names: "re:head" alone would match nothing.
        (["re:.*\\.bias"], [], ("features.0.bias", "features.1.bias", "head.bias", "fc.bias")),
        (["re:head", "re:fc\\.weight"], [], ("fc.weight",)),
        (
            ["re:features\\.[0-9]+\\.weight"],
            [],
            ("features.0.weight", "features.1.weight", "features.3.weight"),
        ),
        # A torch.nn type absent from the model is not an error; it just selects nothing.
        (["LSTM", "fc"], [], ("fc.weight",)),
        # ignore removes what targets selected, with the same syntax.
        (["Conv2d", "Linear"], ["fc"], ("features.0.weight", "features.3.weight", "head.weight")),
        (
            ["Conv2d", "Linear"],
            ["TaggedLinear"],
            ("features.0.weight", "features.3.weight", "fc.weight"),
        ),
        (["Conv2d", "Linear"], ["re:features\\..*"], ("head.weight", "fc.weight")),
        (
            ["re:.*"],
            ["re:.*\\.weight", "features.1.bias"],
            ("features.0.bias", "head.bias", "fc.bias"),
        ),
    ],
)
def test_selectors(targets, ignore, expected):
    assert _select(targets, ignore) == expected


def _one_line_config_error(excinfo: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("targets", "ignore", "path", "hint"),
    [
        (["Conv2"], [], "prune.targets[0]", "'Conv2d'"),
        (["Linear", "fcc"], [], "prune.targets[1]", "'fc'"),
        (["Linear"], ["haed"], "prune.ignore[0]", "'head'"),
        (["features.3.wieght"], [], "prune.targets[0]", "'features.3.weight'"),
    ],
)
def test_unknown_selector_names_path_and_suggests(targets, ignore, path, hint):
    with pytest.raises(ConfigError) as excinfo:
        _select(targets, ignore)
    message = _one_line_config_error(excinfo)
    assert f"@ {path}" in message
    assert f"did you mean {hint}?" in message
    assert repr((targets + ignore)[-1]) in message


def test_error_path_uses_where_prefix():
    with pytest.raises(ConfigError, match=r"@ estimator\.targets\[0\]"):
        _select(["Conv2"], where="estimator")


@pytest.mark.parametrize(
    ("targets", "ignore", "path"),
    [(["re:("], [], "prune.targets[0]"), (["Linear"], ["fc", "re:[a-"], "prune.ignore[1]")],
)
def test_invalid_regex(targets, ignore, path):
    with pytest.raises(ConfigError) as excinfo:
        _select(targets, ignore)
    message = _one_line_config_error(excinfo)
    assert "invalid regex" in message
    assert f"@ {path}" in message


@pytest.mark.parametrize(
    ("targets", "ignore"),
    [(["LSTM"], []), (["Linear"], ["Linear"]), (["re:nothing.*"], []), ([], [])],
)
def test_empty_selection(targets, ignore):
    with pytest.raises(ConfigError) as excinfo:
        _select(targets, ignore)
    message = _one_line_config_error(excinfo)
    assert "@ prune.targets" in message
    assert "Net" in message


def test_parameters_of_a_model_without_them():
    layout = select_parameters(Net(), ["fc"])
    with pytest.raises(ConfigError, match="'fc.weight' is not in the model"):
        layout.parameters(nn.Sequential(nn.Linear(2, 2)))


# -- the flat layout ------------------------------------------------------------------------------

shapes_st = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


def _layout(shapes) -> ParamLayout:
    return ParamLayout(
        names=tuple(f"p{i}.weight" for i in range(len(shapes))),
        shapes=tuple(torch.Size(s) for s in shapes),
        module_types=("Linear",) * len(shapes),
    )


@given(shapes=shapes_st, batch=st.lists(st.integers(1, 3), max_size=2).map(tuple))
@example(shapes=[(), (3,)], batch=())
def test_flatten_unflatten_round_trip(shapes, batch):
    layout = _layout(shapes)
    tensors = [torch.randn((*batch, *s)) for s in shapes]
    flat = layout.flatten(tensors)
    expected = torch.cat([t.reshape(*batch, -1) for t in tensors], dim=-1)
    assert torch.equal(flat, expected)
    assert flat.shape == (*batch, layout.d)
    assert layout.d == sum(int(torch.Size(s).numel()) for s in shapes)
    back = layout.unflatten(flat)
    assert all(torch.equal(a, b) for a, b in zip(back, tensors, strict=True))
    # unflatten returns views: writing through them writes the flat vector.
    back[-1].fill_(7.0)
    assert bool((flat[..., layout.slice(len(layout) - 1)] == 7.0).all())


@given(shapes_st)
def test_sizes_offsets_and_param_index(shapes):
    layout = _layout(shapes)
    assert layout.sizes == tuple(int(torch.Size(s).numel()) for s in shapes)
    assert layout.offsets[0] == 0 and layout.offsets[-1] == layout.d
    index = layout.param_index()
    assert index.shape == (layout.d,)
    for i in range(len(layout)):
        assert bool((index[layout.slice(i)] == i).all())


def _channel_ground_truth(shapes) -> torch.Tensor:
    """Channel id of every flat coordinate, built by broadcasting dim-0 ids over each shape."""
    ids, start = [], 0
    for shape in shapes:
        if len(shape) == 0:
            ids.append(torch.tensor([start]))
            start += 1
            continue
        channel = torch.arange(shape[0]).reshape(-1, *([1] * (len(shape) - 1)))
        ids.append((start + channel).expand(shape).reshape(-1))
        start += shape[0]
    return torch.cat(ids)


@given(shapes_st)
def test_channel_index_matches_broadcast_ground_truth(shapes):
    layout = _layout(shapes)
    channel = layout.channel_index()
    assert torch.equal(channel, _channel_ground_truth(shapes))
    assert sum(layout.channels) == int(channel.max()) + 1
    # Every coordinate's channel belongs to that coordinate's parameter.
    assert torch.equal(layout.channel_param_index()[channel], layout.param_index())


def test_gather_scatter_round_trip():
    torch.manual_seed(0)
    model = Net()
    layout = select_parameters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = layout.gather(model)
    params = dict(model.named_parameters())
    assert torch.equal(flat, torch.cat([params[n].detach().reshape(-1) for n in layout.names]))
    flat.zero_()  # gather returns a copy: the model is not touched
    assert torch.equal(params["fc.weight"], before["fc.weight"])

    new = torch.randn(layout.d)
    layout.scatter_(model, new)
    assert torch.equal(layout.gather(model), new)
    for name, value in before.items():  # unselected parameters unchanged
        if name not in layout.names:
            assert torch.equal(params[name], value)
    assert all(params[n].requires_grad for n in layout.names)


# -- blocks ---------------------------------------------------------------------------------------

sizes_st = st.lists(st.integers(1, 20), min_size=1, max_size=6)
block_st = st.one_of(st.none(), st.integers(1, 9))


def _block_ground_truth(sizes, block_size) -> torch.Tensor:
    """Block id of every coordinate: rank of the key (parameter, local index // block_size)."""
    pid = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    local = torch.cat([torch.arange(s) for s in sizes])
    if block_size is None:
        return torch.zeros(sum(sizes), dtype=torch.long)
    key = pid * (max(sizes) + 1) + local // block_size
    return torch.unique(key, return_inverse=True)[1]


@given(sizes=sizes_st, block_size=block_st)
@example(sizes=[5, 3], block_size=5)
@example(sizes=[7], block_size=1)
@example(sizes=[2, 2], block_size=9)
def test_block_partition(sizes, block_size):
    blocks = BlockLayout.build(sizes, block_size)
    d = sum(sizes)
    truth = _block_ground_truth(sizes, block_size)
    assert blocks.d == d
    assert torch.equal(blocks.block_of(), truth)
    assert blocks.n_blocks == int(truth.max()) + 1
    counts = torch.bincount(truth)
    assert torch.equal(blocks.lengths, counts)
    assert torch.equal(blocks.starts, torch.cumsum(counts, 0) - counts)
    assert blocks.width == int(counts.max())

    if block_size is None:  # one block over everything, across parameters
        assert blocks.n_blocks == 1 and blocks.width == d
        return
    # Never crosses a parameter: first and last coordinate of a block share a parameter.
    pid = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ends = blocks.starts + blocks.lengths - 1
    assert torch.equal(pid[blocks.starts], pid[ends])
    # Within a parameter, every block but the last is full; the last holds the remainder.
    assert blocks.width <= block_size
    for p, size in enumerate(sizes):
        lengths = blocks.lengths[pid[blocks.starts] == p].tolist()
        full, rest = divmod(size, block_size)
        assert lengths == [block_size] * full + ([rest] if rest else [])


@given(sizes=sizes_st, block_size=block_st, batch=st.lists(st.integers(1, 3), max_size=2))
def test_pack_unpack(sizes, block_size, batch):
    blocks = BlockLayout.build(sizes, block_size)
    x = torch.randn((*batch, blocks.d), dtype=torch.float64) + 10.0  # never 0: padding stands out
    packed = blocks.pack(x)
    assert packed.shape == (*batch, blocks.n_blocks, blocks.width)
    valid = blocks.valid()
    index = blocks.padded_index()
    assert torch.equal(valid, index < blocks.d)
    assert torch.equal(index[valid], torch.arange(blocks.d))  # real slots in flat order
    assert bool((packed[..., ~valid] == 0).all())  # zero padding
    assert torch.equal(packed[..., valid], x)
    # Slot (b, j) holds coordinate starts[b] + j.
    b, j = valid.nonzero(as_tuple=True)
    assert torch.equal(packed[..., b, j], x[..., blocks.starts[b] + j])
    assert torch.equal(blocks.unpack(packed), x)


def test_layout_blocks_delegates_to_block_layout():
    layout = select_parameters(Net())
    blocks = layout.blocks(4)
    expected = BlockLayout.build(layout.sizes, 4)
    assert torch.equal(blocks.starts, expected.starts)
    assert torch.equal(blocks.lengths, expected.lengths)
    assert layout.blocks(None).n_blocks == 1


@pytest.mark.parametrize("block_size", [0, -3])
def test_block_size_below_one(block_size):
    with pytest.raises(ConfigError) as excinfo:
        BlockLayout.build([4, 4], block_size)
    message = _one_line_config_error(excinfo)
    assert f"block_size must be >= 1, got {block_size}" in message
    assert "@ estimator.block_size" in message


def test_block_group_rows_hold_each_blocks_indices():
    blocks = BlockLayout.build((5, 3), 2)  # blocks: [0,1] [2,3] [4] [5,6] [7]
    index = torch.tensor([0, 1, 3, 5, 6, 7])
    groups, row, col = blocks.group(index)
    assert groups.tolist() == [[0, 1], [3, -1], [5, 6], [7, -1]]
    assert torch.equal(groups[row, col], index)
