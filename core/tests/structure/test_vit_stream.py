"""Structure coverage (issue 18), last item: the residual stream (hidden dim) of a ViT.

torchvision's ``VisionTransformer`` at toy size (hidden 16, 2 heads, MLP 32, 2 blocks, 32×32
images in 8×8 patches): the stream is one coupled group from ``conv_proj`` through the literal
``hidden_dim`` reshape, the class token, the position embedding, every LayerNorm, every
attention module (in-projection columns, out-projection rows) and MLP, to the classifier.

Ground truth, in float64: the masked model (structure rows, biases, LayerNorm γ, β and the
embeddings' entries zeroed through :class:`curvprune.MaskSet`) with the stream's LayerNorms
taking their statistics over the kept channels (:func:`curvprune.structure.norms.kept_statistics`,
the channels truly absent), and the gated model (a gate of 0 per removed structure) equal to
the plain masked one: :func:`curvprune.testing.removal.check`, to 1e-12 of the output scale.
Removal only drops exact zeros from sums, so float64 round-off of reordered sums (~1e-15) is
all that may differ; a wrong row, column or embedding entry gives differences of order 1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from curvprune import StructureGraph, UnsupportedModelError, apply_removal
from curvprune.structure.attention import HeadGroup
from curvprune.structure.attention_mha import HeadPrunedMultiheadAttention
from curvprune.testing.nets import randomize_
from curvprune.testing.removal import check, gap, masked_copy, rescue, structured

torchvision = pytest.importorskip("torchvision")

HEADS = ("Conv2d", "Linear", "MultiheadAttention")  # prunes the heads too
BLOCKS = ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1")


def vit(hidden: int = 16, mlp: int = 32) -> nn.Module:
    """The toy ViT with every parameter random (torchvision starts the class token and the
    classifier at zero, which would make the embedding and the output checks vacuous)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=hidden,
        mlp_dim=mlp, num_classes=10)
    return randomize_(model.double(), torch.Generator().manual_seed(1)).eval()


def images(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def kept_indices(layout, keep: torch.Tensor) -> dict[str, list[int]]:
    s = layout.structures
    return {g.name: keep[s.group_slice(i)].nonzero().squeeze(1).tolist()
            for i, g in enumerate(s.groups)}


def stream_keep(layout, drop: list[int]) -> torch.Tensor:
    """Keep every structure but channels ``drop`` of the stream."""
    s = layout.structures
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    first = s.group_slice([g.name for g in s.groups].index("conv_proj")).start
    keep[first + torch.tensor(drop)] = False
    return keep


# --------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------
def test_the_stream_is_one_group_with_every_coupled_member():
    model = vit()
    graph = StructureGraph.trace(model)
    stream = graph.group("conv_proj")
    assert stream.removable, stream.reason
    assert stream.size == 16 and stream.coupled
    assert stream.producers == ("conv_proj", *(f"{b}.{m}" for b in BLOCKS
                                                for m in ("self_attention.out_proj", "mlp.3")))
    assert stream.consumers == (*((f"{b}.{m}", 1) for b in BLOCKS
                                  for m in ("self_attention", "mlp.0")), ("heads.head", 1))
    assert stream.renorms == (*(f"{b}.{m}" for b in BLOCKS for m in ("ln_1", "ln_2")),
                              "encoder.ln")
    assert stream.embeddings == (("class_token", 2, (1, 1, 16)),
                                 ("encoder.pos_embedding", 2, (1, 17, 16)))
    # the literal hidden size of the patch reshape is the model's hidden_dim
    assert stream.literals == (("reshape", 1, "", "hidden_dim", 16),)
    # gates: on dim 1 of the patch map, on the last dim of the tokens; the attention modules'
    # out_proj is not called as a module, so their output is gated
    gates = dict(zip(stream.gates, stream.gate_dims, strict=True))
    assert gates["conv_proj"] == 1 and gates[f"{BLOCKS[0]}.self_attention"] == -1
    assert gates[f"{BLOCKS[1]}.mlp.3"] == -1 and gates["encoder.ln"] == -1
    # the other groups: 2 MLP hidden groups, the classifier, 2 head groups; nothing refused
    names = [g.name for g in graph.groups]
    assert names == ["conv_proj", f"{BLOCKS[0]}.mlp.0", f"{BLOCKS[1]}.mlp.0", "heads.head",
                     f"{BLOCKS[0]}.self_attention", f"{BLOCKS[1]}.self_attention"]
    assert [g.name for g in graph.groups if not g.removable] == ["heads.head"]


def test_the_stream_is_prunable_with_the_default_and_the_head_targets():
    model = vit()
    for targets, heads in (((), 0), (HEADS, 2)):
        layout = structured(model, targets) if targets else structured(model)
        groups = layout.structures.groups
        assert groups[0].name == "conv_proj" and groups[0].size == 16
        assert sum(isinstance(g, HeadGroup) for g in groups) == heads
        # the stream's structures own the rows of conv_proj, every out_proj and mlp.3
        sid = layout.structure_index()[layout.channel_index()]
        rows = layout.unflatten(sid.double())
        for name in ("conv_proj.weight", f"{BLOCKS[1]}.self_attention.out_proj.weight",
                     f"{BLOCKS[0]}.mlp.3.weight"):
            row_ids = rows[layout.names.index(name)].reshape(16, -1)[:, 0]
            assert row_ids.tolist() == list(range(16))


# --------------------------------------------------------------------------------------------
# Removal equals the model without the channels
# --------------------------------------------------------------------------------------------
def test_stream_removal_alone_equals_kept_statistics_and_updates_the_widths():
    model, x = vit(), images()
    keep = stream_keep(structured(model), [0, 3, 4, 9, 15])
    dense = copy.deepcopy(model)
    removed, layout, plain = check(model, keep, x)
    assert plain > 1e-6  # the LayerNorms no longer count the zeros: plain masked != removed
    kept = [c for c in range(16) if c not in (0, 3, 4, 9, 15)]
    assert removed.hidden_dim == 11 and removed.seq_length == 17
    assert removed.conv_proj.out_channels == 11
    assert torch.equal(removed.class_token, dense.class_token[..., kept])
    assert torch.equal(removed.encoder.pos_embedding, dense.encoder.pos_embedding[..., kept])
    assert removed.encoder.ln.normalized_shape == (11,)
    assert removed.heads.head.in_features == 11
    for b in (0, 1):
        new, old = removed.encoder.layers[b], dense.encoder.layers[b]
        attn = new.self_attention
        assert isinstance(attn, HeadPrunedMultiheadAttention)
        assert (attn.embed_dim, attn.kdim, attn.vdim) == (11, 11, 11)
        assert attn._qkv_same_embed_dim and (attn.num_heads, attn.head_dim) == (2, 8)
        assert torch.equal(attn.in_proj_weight, old.self_attention.in_proj_weight[:, kept])
        assert torch.equal(attn.out_proj.weight, old.self_attention.out_proj.weight[kept])
        assert attn.out_proj.out_features == 11 and attn.out_proj.in_features == 16
        assert new.mlp[0].in_features == 11 and new.mlp[3].out_features == 11
        assert new.ln_1.weight.shape == (11,) and new.ln_2.normalized_shape == (11,)
    with torch.no_grad():
        assert removed(x).shape == (2, 10)
    # a fresh model rebuilt from the kept indices loads the state dict and computes the same
    fresh = vit()
    apply_removal(fresh, kept_indices(layout, keep))
    assert fresh.hidden_dim == 11
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), removed(x))


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_stream_heads_and_mlp_units_removed_together(data):
    model, x = vit(), images(data.draw(st.integers(0, 2**16), label="input seed"))
    layout = structured(model, HEADS)
    n = layout.n_structures
    keep = rescue(torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n))),
                  layout)
    removed, layout, _ = check(model, keep, x, targets=HEADS)
    s = layout.structures
    counts = {g.name: int(keep[s.group_slice(i)].sum()) for i, g in enumerate(s.groups)}
    assert removed.hidden_dim == counts["conv_proj"]
    for b in BLOCKS:
        attn = removed.get_submodule(f"{b}.self_attention")
        assert attn.embed_dim == counts["conv_proj"]
        assert attn.num_heads == counts[f"{b}.self_attention"]
        assert attn.in_proj_weight.shape == (3 * 8 * attn.num_heads, counts["conv_proj"])
        assert removed.get_submodule(f"{b}.mlp.0").out_features == counts[f"{b}.mlp.0"]
    with torch.no_grad():
        out = removed(x)
    assert out.shape == (2, 10)
    fresh = vit()
    apply_removal(fresh, kept_indices(layout, keep))
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_gates_are_exact_differentiable_and_leave_the_parameters():
    """Gate sensitivities of the stream reach its embeddings; the gated values never stay."""
    model, x = vit(), images()
    layout = structured(model, HEADS)
    s = layout.structures
    keep = rescue(torch.rand(s.n_structures, generator=torch.Generator().manual_seed(5)) > 0.3,
                  layout)
    gates = keep.double().requires_grad_()
    with s.gates(model, gates):
        out = model(x)
    reference = masked_copy(model, layout, keep)
    with torch.no_grad():
        assert gap(out.detach(), reference(x)) <= 1e-12
    out.square().sum().backward()
    stream = s.group_slice(0)
    assert bool((gates.grad[stream] != 0).all())
    assert "class_token" not in vars(model) and "pos_embedding" not in vars(model.encoder)
    assert isinstance(model.class_token, nn.Parameter)
    with torch.no_grad(), s.gates(model, torch.ones(s.n_structures, dtype=torch.float64)):
        assert gap(model(x), copy.deepcopy(model)(x)) <= 1e-12
    # the embeddings' removed entries are masked with the structures
    masks = s.gate_masks(keep)
    channels = keep[stream]
    assert torch.equal(masks["encoder.pos_embedding"], channels.expand(1, 17, 16))
    assert torch.equal(masks["class_token"], channels.view(1, 1, 16))


# --------------------------------------------------------------------------------------------
# The literal hidden size: a GraphModule's is rewritten, a plain module's must be unambiguous
# --------------------------------------------------------------------------------------------
def test_an_ambiguous_literal_is_refused_with_the_node_named():
    model = vit(hidden=16, mlp=16)  # hidden_dim == mlp_dim: which one did the reshape read?
    graph = StructureGraph.trace(model)
    stream = graph.group("conv_proj")
    assert not stream.removable
    assert stream.reason.startswith(
        "reshape at node 'reshape' has the literal channel count 16: the model "
        "(VisionTransformer) has 2 int attributes (hidden_dim, mlp_dim) equal to it")
    assert "\n" not in stream.reason
    assert graph.group(f"{BLOCKS[0]}.mlp.0").removable  # the MLP units and heads still prune
    with pytest.raises(UnsupportedModelError, match="cannot remove channels of group "
                       "'conv_proj': reshape at node 'reshape' has the literal channel count"):
        apply_removal(vit(hidden=16, mlp=16), {"conv_proj": list(range(12))})


def test_a_graph_module_has_its_literal_rewritten():
    model = torch.fx.symbolic_trace(vit(hidden=16, mlp=16))
    x = images()
    stream = StructureGraph.trace(model).group("conv_proj")
    assert stream.removable and stream.literals == (("reshape", 1, "", "", 16),)
    keep = stream_keep(structured(model), [1, 2, 5])
    removed, _, _ = check(model, keep, x)
    reshape = next(n for n in removed.graph.nodes if n.name == "reshape")
    assert reshape.args[2] == 13
    with torch.no_grad():
        assert removed(x).shape == (2, 10)


class Tokens(nn.Module):
    """A patch embedding made tokens and refused ways of touching them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.width = 4 if how != "no-attribute" else None
        self.proj = nn.Conv2d(3, 4, 2, stride=2)
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.register_buffer("pos", torch.randn(1, 5, 4))
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x, memory=None):
        y = self.proj(x)
        n = y.shape[0]
        if self.how in ("attribute", "no-attribute", "elsewhere"):
            width = 4 if self.how == "no-attribute" else self.width
            t = y.reshape(n, width, -1).permute(0, 2, 1)
        else:
            t = y.flatten(2).transpose(1, 2)
        if self.how == "elsewhere":
            t = t * 4
        size = (n, 1, 4) if self.how == "expand-literal" else (n, -1, -1)
        t = torch.cat([self.token.expand(*size), t], dim=1)
        if self.how == "buffer":
            t = t + self.pos
        if self.how == "cross":
            t = t + self.attn(t, memory, memory)[0]
        else:
            t = t + self.attn(t, t, t)[0]
        t = self.norm(t)
        return self.head(t[:, :, 0] if self.how == "select-channel" else t[:, 0])


@pytest.mark.parametrize(("how", "reason"), [
    ("no-attribute", "reshape at node 'reshape' has the literal channel count 4: the model "
                     "(Tokens) has no int attribute equal to it"),
    ("elsewhere", "reshape at node 'reshape' has the literal channel count 4: the number also "
                  "appears at node 'mul' of the model (Tokens)'s code"),
    ("expand-literal", "cat at node 'cat' with 'token' of shape ['expanded', 'expanded', "
                       "'expanded'], not one entry per channel"),
    ("buffer", "add at node 'add' adds 'pos' (a buffer: masking cannot zero its removed "
               "channels)"),
    ("cross", "MultiheadAttention 'attn' reads query, key and value that are not channels of "
              "one layout"),
    ("select-channel", "getitem at node 'getitem_2' is not handled (only int and slice "
                       "indices of the dims before the channels"),
])
def test_what_the_stream_rules_refuse_is_named(how, reason):
    group = StructureGraph.trace(Tokens(how)).group("proj")
    assert not group.removable and reason in group.reason, group.reason
    assert "\n" not in group.reason


def test_the_same_net_written_plainly_removes_exactly():
    model = randomize_(Tokens("attribute").double(), torch.Generator().manual_seed(3)).eval()
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    layout = structured(model)
    assert layout.structures.groups[0].literals == (("reshape", 1, "", "width", 4),)
    keep = torch.tensor([True, False, True, False])
    removed, _, plain = check(model, keep, x)
    assert plain > 1e-6  # its LayerNorm reads the stream
    assert removed.width == 2 and removed.attn.embed_dim == 2 and removed.token.shape == (1, 1, 2)
    with torch.no_grad():
        assert removed(x).shape == (2, 3)


@pytest.mark.slow
def test_torchvision_vit_b_16_stream_is_one_prunable_group():
    """The full-size model traces the same way (the removal itself is measured by
    benchmarks/structured_coverage.py: 4e-15 in float64)."""
    model = torchvision.models.vit_b_16(weights=None)
    graph = StructureGraph.trace(model)
    stream = graph.group("conv_proj")
    assert stream.removable, stream.reason
    assert stream.size == 768 and len(stream.producers) == 25 and len(stream.renorms) == 25
    assert stream.literals == (("reshape", 1, "", "hidden_dim", 768),)
    assert [p for p, _, _ in stream.embeddings] == ["class_token", "encoder.pos_embedding"]
    assert [g.name for g in graph.groups if not g.removable] == ["heads.head"]
    assert len(graph.groups) == 26  # stream, 12 MLP hidden groups, 12 head groups, classifier
