"""Group sums (issue 18) on every tracer pattern past BatchNorm streams: a ViT's residual stream
(class token, position embedding, LayerNorms, attention in-projection columns and out-projection
rows), attention heads, ConvNeXt LayerNorms and layer scales, GroupNorm blocks, channel shuffles,
``nn.MultiheadAttention`` models, a conv reading and writing the same stream, and Hugging Face
heads and MLP units.

Ground truth: physical removal (:func:`curvprune.remove_structures`) only deletes entries, so
for each structure s the count of ``group_sums(fn = ones_like)`` must be the number of parameters
that disappear when s alone is removed from a copy, the L1 sum what Σ|θ| drops by and the
squared sum what Σθ² drops by, with and without structures removed before (whose entries then
count in no other sum). A missed member (a LayerNorm's γ, the position embedding's column, an
in-projection column) or an entry counted twice changes the count by at least one.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvprune
from curvprune import PruneContext, StructureGraph, remove_structures, select_parameters
from curvprune.builtin.group_saliency import group_sums, unsupported_group
from curvprune.testing.nets import TinyResNet, randomize_
from curvprune.testing.removal import assert_group_sums_match_removal, structured, weights_mask

torchvision = pytest.importorskip("torchvision")
from torchvision.models.convnext import CNBlock, LayerNorm2d  # noqa: E402

HOST = curvprune.get_plugin_manager(autoload=False)
HEADS = ("Conv2d", "Linear", "MultiheadAttention")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def tiny_vit() -> nn.Module:
    # hidden_dim 24 equals no other int attribute (the literal reshape resolves to hidden_dim)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=24, mlp_dim=40,
        num_classes=10)


class ConvNeXtish(nn.Module):
    """A ConvNeXt stem (conv, LayerNorm2d), two CNBlocks (depthwise conv, LayerNorm over the
    channels-last tokens, Linear, GELU, Linear, layer scale [C, 1, 1]), a downsample and a head."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, stride=2), LayerNorm2d(c))
        self.stage = nn.Sequential(CNBlock(c, 1e-6, 0.0), CNBlock(c, 1e-6, 0.0))
        self.down = nn.Sequential(LayerNorm2d(c), nn.Conv2d(c, 2 * c, 2, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), LayerNorm2d(2 * c), nn.Flatten(1),
                                  nn.Linear(2 * c, 5))

    def forward(self, x):
        return self.head(self.down(self.stage(self.stem(x))))


class ChannelsLastScales(nn.Module):
    """A LayerNorm over channels-last features, a layer scale of shape [C] (a parameter) and a
    fixed scale buffer [C, 1, 1] (sliced, but no parameter), a flatten into the classifier."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 3 * c), nn.Linear(3 * c, c)
        self.scale = nn.Parameter(torch.ones(c))
        self.register_buffer("fixed", torch.linspace(0.5, 1.5, c)[:, None, None])
        self.mix = nn.Conv2d(c, c, 1)
        self.fc = nn.Linear(c * 16, 5)

    def forward(self, x):
        y = self.conv(x)
        z = self.fc2(torch.relu(self.fc1(self.norm(y.permute(0, 2, 3, 1))))) * self.scale
        y = (y + z.permute(0, 3, 1, 2)) * self.fixed
        return self.fc(torch.flatten(torch.relu(self.mix(y)), 1))


class GroupNormNet(nn.Module):
    """GroupNorms of 3 groups of 4 channels, of one channel per group, and a residual stream
    normalised by 2 groups of 3 channels (structures are whole GroupNorm groups: ``block``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn_a = nn.Conv2d(3, 12, 3, padding=1), nn.GroupNorm(3, 12)
        self.b, self.gn_b = nn.Conv2d(12, 6, 1), nn.GroupNorm(6, 6)
        self.c, self.gn_c = nn.Conv2d(6, 6, 3, padding=1), nn.GroupNorm(2, 6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.gn_b(self.b(torch.relu(self.gn_a(self.a(x))))))
        y = y + self.gn_c(self.c(y))
        return self.fc(y.mean((2, 3)))


class GroupedGroupNorm(nn.Module):
    """A GroupNorm of 4 groups of 2 channels read by a grouped conv (2 groups): a structure is
    one GroupNorm group in each conv group (``block`` 2 × ``copies`` 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.gn = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8)
        self.g = nn.Conv2d(8, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.g(torch.relu(self.gn(self.a(x)))).mean((2, 3)))


def view_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel_shuffle."""
    n, c, h, w = x.size()
    x = torch.transpose(x.view(n, groups, c // groups, h, w), 1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffledMap(nn.Module):
    """One conv's 6 channels shuffled in 3 groups, then BN, a depthwise conv and a 1×1 conv
    (each reads the group at stride 3), and a flatten into the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw, self.fc = nn.Conv2d(6, 4, 1), nn.Linear(4 * 9, 5)

    def forward(self, x):
        y = torch.relu(self.bn(view_shuffle(self.conv(x), 3)))
        return self.fc(torch.flatten(torch.relu(self.pw(torch.relu(self.dw(y)))), 1))


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 stage's first unit (two branches concatenated, shuffled in 2), then the
    next unit's split: one half into a conv, the other through a BN into another conv."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.c1, self.c2 = nn.Conv2d(c, 3, 1), nn.Conv2d(c, 3, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x1, x2 = view_shuffle(torch.cat([self.a(x), self.b(x)], 1), 2).chunk(2, dim=1)
        z = torch.cat([self.c1(x1), self.c2(torch.relu(self.bn(x2)))], 1)
        return self.fc(z.mean((2, 3)))


class AttentionNet(nn.Module):
    """Tokens embedded by a Linear, a pre-norm self-attention block (``nn.MultiheadAttention``:
    the stream is its in-projection's columns and its out-projection's rows) and an MLP, a mean
    over the tokens into the classifier."""

    def __init__(self, d: int = 6, heads: int = 2, bias: bool = True) -> None:
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.norm = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, bias=bias, batch_first=True)
        self.up, self.down = nn.Linear(d, 7), nn.Linear(7, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        t = self.embed(x)
        q = self.norm(t)
        t = t + self.attn(q, q, q, need_weights=False)[0]
        t = t + self.down(F.gelu(self.up(t)))
        return self.head(t.mean(1))


class SelfResidual(nn.Module):
    """``y = x + conv(x)``: one conv reads and writes the same stream, so its entry (c, c) is a
    row and a column of the same structure (counted once)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), \
            nn.Linear(4, 5)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.conv(torch.relu(y))
        return self.fc(y.mean((2, 3)))


MODELS = {
    "vit": (tiny_vit, ()),
    "vit-heads": (tiny_vit, HEADS),
    "convnext": (ConvNeXtish, ()),
    "channels-last-scales": (ChannelsLastScales, ()),
    "groupnorm": (GroupNormNet, ()),
    "grouped-groupnorm": (GroupedGroupNorm, ()),
    "shuffled-map": (ShuffledMap, ()),
    "shuffle-unit": (ShuffleUnit, ()),
    "mha": (AttentionNet, ()),
    "mha-heads": (AttentionNet, HEADS),
    "mha-no-bias-heads": (lambda: AttentionNet(bias=False), HEADS),
    "self-residual": (SelfResidual, ()),
}


def build(name: str) -> tuple[nn.Module, object]:
    make, targets = MODELS[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    model = randomize_(make().double(), gen).eval()  # no zero class token or classifier
    return model, structured(model, targets) if targets else structured(model)


def earlier_removal(layout) -> torch.Tensor:
    """An earlier step removed the first structure of every group of two or more."""
    s = layout.structures
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    for g in range(s.n_groups):
        piece = s.group_slice(g)
        if piece.stop - piece.start > 1:
            keep[piece.start] = False
    return keep


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_sums_equal_what_removal_deletes(name):
    model, layout = build(name)
    assert unsupported_group(layout.structures, model) is None
    for keep_before in (torch.ones(layout.n_structures, dtype=torch.bool),
                        earlier_removal(layout)):
        assert_group_sums_match_removal(model, layout, keep_before)


def test_the_vit_stream_counts_every_member_by_hand():
    """Stream channel c of the ViT (hidden 24, 2 blocks, MLP 40, 17 tokens, 3·24 in-projection
    rows, 10 classes): conv_proj row (3·8·8) and bias, the class token's and all 17 positions'
    entries, 5 LayerNorms' γ and β, per block the in-projection column (72 rows), out_proj row
    (24) and bias, mlp.0's column (40 rows), mlp.3's row (40) and bias, and the head's column."""
    model, layout = build("vit")
    ones = group_sums(model, layout, layout.gather(model),
                      torch.ones(layout.d, dtype=torch.bool), torch.ones_like)
    stream = 192 + 1 + 1 + 17 + 5 * 2 + 2 * (72 + 24 + 1 + 40 + 40 + 1) + 10
    assert ones[: 24].tolist() == [stream] * 24
    # an MLP unit: mlp.0's row (24) and bias, mlp.3's column (24 rows)
    assert ones[24:64].tolist() == [24 + 1 + 24] * 40


def test_attention_heads_and_the_stream_share_in_projection_entries():
    """With the heads pruned too, a head's q, k, v rows (3·12 of 24 columns), biases and
    out-projection columns (12 of 24 rows) count for the head, and every entry of its rows
    also for the stream channel of its column; removing a stream channel first takes its
    column out of every head's sum."""
    model, layout = build("vit-heads")
    s = layout.structures
    heads = [i for i, g in enumerate(s.groups) if type(g).__name__ == "HeadGroup"]
    assert len(heads) == 2
    full = torch.ones(layout.d, dtype=torch.bool)
    ones = group_sums(model, layout, layout.gather(model), full, torch.ones_like)
    head = s.group_slice(heads[0])
    assert ones[head].tolist() == [3 * 12 * 24 + 3 * 12 + 24 * 12] * 2
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    keep[0] = False  # stream channel 0
    fewer = group_sums(model, layout, layout.gather(model), weights_mask(keep, layout),
                       torch.ones_like)
    assert fewer[head].tolist() == [3 * 12 * 23 + 3 * 12 + 23 * 12] * 2


def test_shufflenet_v2_structures_count_what_removal_deletes():
    """torchvision's ShuffleNetV2 (x0.5): every prunable group (branch convs, depthwise convs
    copied across conv groups; its shuffled streams are refused by the tracer, so strides are
    checked on the units above), three structures of each (first, middle, last)."""
    torch.manual_seed(0)
    model = randomize_(torchvision.models.shufflenet_v2_x0_5(weights=None).double(),
                       torch.Generator().manual_seed(0)).eval()
    layout = structured(model)
    s = layout.structures
    assert s.n_groups == 20
    assert unsupported_group(s, model) is None
    check = sorted({i for g in range(s.n_groups) for i in
                    (s.group_slice(g).start, (s.group_slice(g).start + s.group_slice(g).stop) // 2,
                     s.group_slice(g).stop - 1)})
    assert_group_sums_match_removal(model, layout, torch.ones(s.n_structures, dtype=torch.bool), check)


def hf_model(kind: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=12, max_position_embeddings=16)).double().eval()
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=1, n_head=4, n_inner=12, n_positions=16,
            bos_token_id=0, eos_token_id=0)).double().eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=12, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).double().eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hugging_face_heads_and_mlp_units_count_what_removal_deletes(kind):
    model = randomize_(hf_model(kind), torch.Generator().manual_seed(4))
    layout = select_parameters(model, ("Linear", "Conv1D"))
    graph = StructureGraph.trace(model, heads_fallback=True)
    layout = layout.with_structures(graph.structures(layout))
    kinds = {type(g).__name__ for g in layout.structures.groups}
    assert kinds == {"HeadGroup", "MlpGroup"}
    assert unsupported_group(layout.structures, model) is None
    for keep_before in (torch.ones(layout.n_structures, dtype=torch.bool),
                        earlier_removal(layout)):
        assert_group_sums_match_removal(model, layout, keep_before)


# --------------------------------------------------------------------------------------------
# The scorer: no fallback left on these models; a member it cannot place is named
# --------------------------------------------------------------------------------------------
def scores(model: nn.Module, layout, **options) -> torch.Tensor:
    ctx = PruneContext(model=model, layout=layout, weights=layout.gather(model),
                       mask=torch.ones(layout.d, dtype=torch.bool), target_sparsity=0.5)
    return curvprune.create("scorer", "magnitude", host=HOST, granularity="channel",
                            **options).score(ctx)


@pytest.mark.parametrize("name", ["vit-heads", "convnext", "groupnorm", "shuffle-unit",
                                  "mha-heads"])
def test_magnitude_group_extent_no_longer_falls_back(name):
    model, layout = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        group = scores(model, layout, norm="l1", normalize="none")
    l1 = group_sums(model, layout, layout.gather(model),
                    torch.ones(layout.d, dtype=torch.bool), torch.abs)
    torch.testing.assert_close(group, l1)
    rows = scores(model, layout, norm="l1", normalize="none", extent="producers")
    assert bool((group > rows).all())  # every structure deletes more than its rows


def test_a_member_the_model_no_longer_has_is_named_and_falls_back():
    """A BatchNorm replaced since the trace (narrower): the sums cannot place its γ, β, so
    the scorer warns, naming the group and the parameter, and scores the producers' rows."""
    model = TinyResNet("basic", widths=(2, 3), blocks=1, stem=2).double().eval()
    layout = structured(model)
    model.bn1 = nn.BatchNorm2d(1).double().eval()
    why = unsupported_group(layout.structures, model)
    assert why is not None and "bn1.weight" in why and "'conv1'" in why
    with pytest.warns(UserWarning, match=r"cannot count every parameter.*bn1\.weight"):
        group = scores(model, layout, norm="l1", normalize="none")
    torch.testing.assert_close(group, scores(model, layout, norm="l1", normalize="none",
                                             extent="producers"))


TORCHVISION = ("resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small",
               "densenet121", "googlenet", "efficientnet_b0", "regnet_x_400mf", "convnext_tiny",
               "vit_b_16", "shufflenet_v2_x0_5", "squeezenet1_0")


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_models_of_the_coverage_benchmark_leave_nothing_uncovered(name):
    """The 13 models of benchmarks/structured_coverage.py, heads selected as there: every group
    is counted (no fallback), and the first group's middle structure (ViT-B/16: a channel of
    its residual stream) counts what removing it deletes."""
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    layout = structured(model, HEADS)
    s = layout.structures
    assert unsupported_group(s, model) is None
    first = s.offsets[0] + s.groups[0].size // 2
    count = group_sums(model, layout, layout.gather(model),
                       torch.ones(layout.d, dtype=torch.bool), torch.ones_like)[first]
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    keep[first] = False
    before = sum(p.numel() for p in model.parameters())
    remove_structures(model, s, keep)
    assert int(count) == before - sum(p.numel() for p in model.parameters())
