"""Attention heads as structures: masked heads == removed heads, num_heads follows.

Ground truth: the same float64 model with the pruned heads masked through
:class:`curvprune.MaskSet` (their q/k/v rows and biases zeroed, or GPT-2's ``c_proj`` rows),
which leaves every module at full width. Removal drops exactly the zero contributions of the
masked heads, but the projections then sum fewer terms in another order, so outputs agree to
float64 round-off of sums of a few dozen terms through a few layers (~1e-14 relative); 1e-10
relative to the output scale leaves a wide margin and still catches any wrong row or column
(those give differences of order 1). Removed weights are also checked against the dense
model's head slices taken by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvprune
from curvprune import (
    Pipeline,
    StructureGraph,
    StructureSkipWarning,
    UnsupportedModelError,
    apply_removal,
    remove_structures,
    select_parameters,
)
from curvprune.structure.attention import HeadGroup, find_heads
from curvprune.structure.attention_mha import HeadPrunedMultiheadAttention
from curvprune.structure.hf_mlp import MlpGroup
from curvprune.testing.removal import masked_copy

transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

HOST = curvprune.get_plugin_manager(autoload=False)
TARGETS = ("Conv2d", "Linear", "Conv1D", "MultiheadAttention")


def structured(model: nn.Module):
    layout = select_parameters(model, TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = StructureGraph.trace(model, heads_fallback=True)
    return layout.with_structures(graph.structures(layout))


def drop_heads(layout, drops: dict[int, list[int]]) -> torch.Tensor:
    """A keep-mask removing structures ``drops[i]`` of the i-th head group."""
    s = layout.structures
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    heads = [i for i, g in enumerate(s.groups) if isinstance(g, HeadGroup)]
    for i, local in drops.items():
        keep[s.offsets[heads[i]] + torch.tensor(local)] = False
    return keep


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a.detach() - b.detach()).abs().max()) <= 1e-10 * scale


def check(model: nn.Module, run, drops: dict[int, list[int]]) -> tuple[nn.Module, object]:
    """Mask and remove ``drops``; the removed model equals the masked one and is smaller."""
    layout = structured(model)
    keep = drop_heads(layout, drops)
    masked = masked_copy(model, layout, keep)
    removed = copy.deepcopy(model)
    result = remove_structures(removed, layout.structures, keep)
    with torch.no_grad():
        dense_out, masked_out, removed_out = run(model), run(masked), run(removed)
    assert removed_out.shape == dense_out.shape
    assert_close(removed_out, masked_out)
    assert float((masked_out - dense_out).abs().max()) > 1e-6  # the heads mattered
    assert result.params_after < result.params_before
    return removed, result


def head_rows(w: torch.Tensor, heads: int, keep: list[int], dim: int = 0) -> torch.Tensor:
    """Rows (or columns) of the kept heads of a weight, by hand."""
    w = w.transpose(0, dim)
    return w.reshape(heads, -1, *w.shape[1:])[keep].reshape(-1, *w.shape[1:]).transpose(0, dim)


# --------------------------------------------------------------------------------------------
# nn.MultiheadAttention and torchvision's ViT
# --------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, embed_dim: int = 16, num_heads: int = 4,
                 **kwargs) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=batch_first,
                                          **kwargs)

    def forward(self, x, key_padding_mask=None, attn_mask=None, need_weights=True):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                         need_weights=need_weights)[0]


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_heads_removed_equal_masked(batch_first):
    torch.manual_seed(0)
    model = SelfAttention(batch_first).double().eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, 3:] = True
    causal = torch.full((5, 5), float("-inf"), dtype=torch.float64).triu(1)

    def run(m):
        return torch.cat([m(x), m(x, need_weights=False), m(x, key_padding_mask=padding),
                          m(x, attn_mask=causal, need_weights=False)])

    removed, result = check(model, run, {0: [1, 3]})
    attn = removed.attn
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
    assert attn.embed_dim == 16 and attn.head_dim == 4 and attn.batch_first == batch_first
    dense = model.attn
    packed = dense.in_proj_weight.reshape(3, 16, 16)
    assert torch.equal(attn.in_proj_weight, torch.cat(
        [head_rows(packed[k], 4, [0, 2]) for k in range(3)]))
    assert torch.equal(attn.out_proj.weight, head_rows(dense.out_proj.weight, 4, [0, 2], 1))
    assert result.kept == {"attn": [2, 4]}
    # unbatched input, and the state dict keys stay those of the stock module
    with torch.no_grad():
        single = x[0] if batch_first else x[:, 0]
        assert attn(single, single, single)[0].shape == (5, 16)
    assert set(removed.state_dict()) == set(model.state_dict())


@settings(max_examples=20, deadline=None)
@given(data=st.data(), heads=st.sampled_from([1, 2, 3, 4]), dim=st.integers(1, 4),
       batch_first=st.booleans(), bias=st.booleans(), need_weights=st.booleans())
def test_any_heads_removed_equal_masked(data, heads, dim, batch_first, bias, need_weights):
    """Any kept subset of heads, any head width, with or without biases and padding."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    torch.manual_seed(int(torch.randint(0, 2**16, (1,), generator=gen)))
    model = SelfAttention(batch_first, embed_dim=heads * dim, num_heads=heads, bias=bias)
    model = model.double().eval()
    layout = structured(model)
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=heads, max_size=heads)))
    keep[data.draw(st.integers(0, heads - 1), label="kept")] = True
    x = torch.randn(2, 4, heads * dim, generator=gen, dtype=torch.float64)
    x = x if batch_first else x.transpose(0, 1)
    padding = torch.rand(2, 4, generator=gen) < 0.3
    padding[:, 0] = False  # every query sees a key
    masked = masked_copy(model, layout, keep)
    result = remove_structures(model, layout.structures, keep)
    with torch.no_grad():
        expected = masked(x, key_padding_mask=padding, need_weights=need_weights)
        out = model(x, key_padding_mask=padding, need_weights=need_weights)
    assert_close(out, expected)
    assert model.attn.num_heads == int(keep.sum())
    assert result.kept == {"attn": [int(keep.sum()), heads]}


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=10).double().eval()
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the classifier at zero
    return model


def test_vit_heads_removed_equal_masked_and_reload():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    removed, result = check(model, lambda m: m(x), {0: [0, 2, 3], 1: [1]})
    layers = removed.encoder.layers
    assert [layers[i].self_attention.num_heads for i in range(2)] == [1, 3]
    # a fresh model rebuilt from the kept indices loads the removed weights
    fresh = small_vit()
    apply_removal(fresh, result.kept_indices)
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), removed(x))


def test_vit_heads_through_the_pipeline():
    model = small_vit()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0, "targets": list(TARGETS)},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "mask": {"name": "channel", "scope": "layerwise", "remove": True},
    }, host=HOST)
    result = pipe.prune(model, None)
    names = [g.name for g in result.masks.layout.structures.groups if isinstance(g, HeadGroup)]
    assert len(names) == 2
    before = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(x)
    removal = pipe.remove(model, result.masks, example_input=x)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10)
    assert_close(out, expected)
    for i in range(2):
        attn = model.encoder.layers[i].self_attention
        assert attn.num_heads == 2 and attn.in_proj_weight.shape == (3 * 2 * 8, 32)
        assert model.encoder.layers[i].mlp[0].out_features == 32
    assert removal.kept[names[0]] == [2, 4]
    assert sum(p.numel() for p in model.parameters()) < before
    assert removal.params_after < removal.params_before


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_min_channels_keeps_a_head_per_attention_module(scope):
    model = small_vit()
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.99, "loss_samples": 0, "targets": list(TARGETS)},
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "mask": {"name": "channel", "scope": scope, "min_channels": 1},
    }, host=HOST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.prune(model, None)
    pipe.remove(model, result.masks)
    assert [layer.self_attention.num_heads for layer in model.encoder.layers] == [1, 1]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).shape == (1, 10)


def test_head_gates_are_exact():
    """A zero gate is the head removed; gates of 1 leave the model unchanged."""
    model = small_vit()
    layout = structured(model)
    s = layout.structures
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keep = drop_heads(layout, {0: [1], 1: [0, 3]})
    with torch.no_grad():
        expected, dense = masked_copy(model, layout, keep)(x), model(x)
        with s.gates(model, keep.double()):
            gated = model(x)
        with s.gates(model, torch.ones(s.n_structures, dtype=torch.float64)):
            ones = model(x)
    assert_close(gated, expected)
    assert_close(ones, dense)
    assert type(model.encoder.layers[0].self_attention) is nn.MultiheadAttention


# --------------------------------------------------------------------------------------------
# Hugging Face BERT, GPT-2, Llama from tiny configs (no download)
# --------------------------------------------------------------------------------------------
def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def test_bert_heads_removed_equal_masked():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=32,
                                     max_position_embeddings=16)
    model = transformers.BertModel(config).double().eval()
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, 4:] = 0

    def run(m):
        return torch.cat([m(tokens).last_hidden_state,
                          m(tokens, attention_mask=mask).last_hidden_state])

    removed, _ = check(model, run, {0: [0, 1], 1: [3]})
    attn = [removed.encoder.layer[i].attention for i in range(2)]
    assert [a.self.num_attention_heads for a in attn] == [2, 3]
    assert [a.self.all_head_size for a in attn] == [8, 12]
    assert attn[0].output.dense.in_features == 8
    dense = model.encoder.layer[1].attention
    assert torch.equal(attn[1].self.value.weight, head_rows(dense.self.value.weight, 4, [0, 1, 2]))
    assert torch.equal(attn[1].self.key.bias, head_rows(dense.self.key.bias, 4, [0, 1, 2]))


def test_gpt2_heads_removed_equal_masked():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=4,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    tokens = ids()
    removed, _ = check(model, lambda m: m(tokens).logits, {0: [2], 1: [0, 1, 3]})
    attn = [block.attn for block in removed.transformer.h]
    assert [a.num_heads for a in attn] == [3, 1] and [a.split_size for a in attn] == [12, 4]
    assert attn[0].c_attn.weight.shape == (16, 36) and attn[0].c_attn.nf == 36
    assert attn[0].c_proj.weight.shape == (12, 16) and attn[0].c_proj.nx == 12
    dense = model.transformer.h[0].attn
    packed = dense.c_attn.weight.reshape(16, 3, 16)
    assert torch.equal(attn[0].c_attn.weight, torch.cat(
        [head_rows(packed[:, k], 4, [0, 1, 3], 1) for k in range(3)], dim=1))
    with torch.no_grad():  # generation through the cache still runs
        out = removed.generate(tokens[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_heads_removed_equal_masked(kv_heads):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=kv_heads,
                                      intermediate_size=32, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    layout = structured(model)
    groups = [g for g in layout.structures.groups if isinstance(g, HeadGroup)]
    assert [g.size for g in groups] == [kv_heads, kv_heads]  # a KV head with its query group
    assert groups[0].per == 4 // kv_heads
    tokens = ids()
    removed, result = check(model, lambda m: m(tokens).logits, {0: [1], 1: [0]})
    per, dim = 4 // kv_heads, 8
    for layer in removed.model.layers:
        a = layer.self_attn
        assert a.head_dim == dim and a.num_key_value_groups == per
        assert a.q_proj.out_features == (kv_heads - 1) * per * dim
        assert a.k_proj.out_features == a.v_proj.out_features == (kv_heads - 1) * dim
        assert a.o_proj.in_features == (kv_heads - 1) * per * dim
    dense = model.model.layers[0].self_attn
    kept = [h for h in range(kv_heads) if h != 1]
    assert torch.equal(removed.model.layers[0].self_attn.q_proj.weight,
                       head_rows(dense.q_proj.weight, kv_heads, kept))
    fresh = transformers.LlamaForCausalLM(config).double().eval()
    apply_removal(fresh, result.kept_indices)
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(tokens).logits, removed(tokens).logits)


def test_untraceable_model_prunes_heads_only_with_a_warning():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=4,
                                     n_positions=16, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    with pytest.raises(UnsupportedModelError, match="cannot trace GPT2LMHeadModel"):
        StructureGraph.trace(model)  # other callers (GReg's rules) keep the error
    graph = StructureGraph.trace(model, heads_fallback=True)
    # the head groups, and the MLP groups of curvprune.structure.hf_mlp (test_hf_mlp.py)
    assert graph.untraced and {type(g) for g in graph.groups} == {HeadGroup, MlpGroup}
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "mask": {"name": "channel"},
    }, host=HOST)
    with pytest.warns(StructureSkipWarning, match="cannot trace GPT2LMHeadModel.*attention heads"):
        pipe.prune(model, None)
    strict = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0},
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "mask": {"name": "channel", "strict": True},
    }, host=HOST)
    with pytest.raises(UnsupportedModelError, match=r"cannot trace GPT2LMHeadModel.*@ mask.strict"):
        strict.prune(model, None)


def hf_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=32, max_position_embeddings=16)).double().eval()
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=1, n_head=4, n_positions=16, bos_token_id=0,
            eos_token_id=0)).double().eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)).double().eval()


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hf_head_gates_are_exact(kind):
    model = hf_model(kind)
    layout = structured(model)
    s = layout.structures
    tokens = ids()

    def run(m):
        out = m(tokens)
        return out.last_hidden_state if kind == "bert" else out.logits

    keep = drop_heads(layout, {0: [1]})
    with torch.no_grad():
        expected, dense = run(masked_copy(model, layout, keep)), run(model)
        with s.gates(model, keep.double()):
            gated = run(model)
        with s.gates(model, torch.ones(s.n_structures, dtype=torch.float64)):
            ones = run(model)
        after = run(model)
    assert_close(gated, expected)
    assert_close(ones, dense)
    assert torch.equal(after, dense)  # the hooks are gone


# --------------------------------------------------------------------------------------------
# Refusals: one line naming the module
# --------------------------------------------------------------------------------------------
class CustomAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 2
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"add_bias_kv": True}, "add_bias_kv"),
    ({"kdim": 8, "vdim": 8}, "kdim/vdim"),
])
def test_unsupported_multihead_attention_is_refused(kwargs, why):
    model = SelfAttention(True, **kwargs).double()  # traced, never run
    graph = StructureGraph.trace(model)
    group = graph.group("attn")
    assert not group.removable and why in group.reason and "'attn'" in group.reason
    assert "\n" not in group.reason
    with pytest.raises(UnsupportedModelError, match=r"heads of attention module 'attn'"):
        apply_removal(model, {"attn": [0, 1]})
    pipe = Pipeline.from_config({
        "prune": {"sparsity": 0.5, "loss_samples": 0, "targets": list(TARGETS)},
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "mask": {"name": "channel"},
    }, host=HOST)
    with pytest.raises(UnsupportedModelError, match=r"attn: MultiheadAttention 'attn': .*"):
        pipe.prune(model, None)  # nothing else to prune: refused, naming the module
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), model)
    with pytest.warns(StructureSkipWarning, match=r"3.attn: MultiheadAttention '3.attn'"):
        pipe.prune(model, None)  # the Linear layers prune; the heads stay, with a warning


def test_unknown_attention_layout_is_refused_not_skipped():
    model = nn.Sequential(nn.Linear(8, 8), CustomAttention())
    graph = StructureGraph.trace(model)
    group = graph.group("1")
    assert isinstance(group, HeadGroup) and not group.removable
    assert "attention module '1' (CustomAttention)" in group.reason
    layout = select_parameters(model)
    assert group in curvprune.structure.graph.skipped_groups(graph, layout)


def test_attention_in_torch_transformer_layers_is_refused():
    """nn.TransformerEncoderLayer's fast path calls a fused kernel on the packed weights."""
    model = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, batch_first=True)
    (group,) = find_heads(model)  # fx cannot trace the layer itself
    assert group.name == "self_attn" and not group.removable
    assert "TransformerEncoderLayer" in group.reason


def test_gpt2_cross_attention_is_refused():
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=4,
                                     n_positions=16, add_cross_attention=True)
    model = transformers.GPT2LMHeadModel(config)
    graph = StructureGraph.trace(model, heads_fallback=True)
    group = graph.group("transformer.h.0.crossattention")
    assert not group.removable and "cross-attention" in group.reason
    assert graph.group("transformer.h.0.attn").removable


# --------------------------------------------------------------------------------------------
# A run that removes heads, and loading it back
# --------------------------------------------------------------------------------------------
TINY_VIT = '''
import torch
import torchvision


class DigitsViT(torch.nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.vit = torchvision.models.VisionTransformer(
            image_size=8, patch_size=4, num_layers=1, num_heads=4, hidden_dim=16, mlp_dim=32,
            num_classes=num_classes)

    def forward(self, x):
        return self.vit(x.reshape(-1, 1, 8, 8).expand(-1, 3, -1, -1))


def build(num_classes=10):
    torch.manual_seed(0)
    return DigitsViT(num_classes)
'''

RUN = """
[model]
name = "module:tiny_vit_heads:build"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.5
loss_samples = 0
targets = ["Linear", "MultiheadAttention"]
[scorer]
name = "magnitude"
granularity = "channel"
[mask]
name = "channel"
scope = "layerwise"
remove = true
[finetune]
epochs = 1
[run]
progress = false
"""


def test_run_removes_heads_and_loads_back(tmp_path):
    import json
    import sys

    from curvprune.run.execute import execute_run

    (tmp_path / "tiny_vit_heads.py").write_text(TINY_VIT)
    (tmp_path / "c.toml").write_text(RUN)
    sys.path.insert(0, str(tmp_path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = execute_run(tmp_path / "c.toml", out=tmp_path / "runs", name="r",
                              quiet=True).run_dir
        import tiny_vit_heads

        fresh = tiny_vit_heads.build()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tiny_vit_heads", None)
    structure = json.loads((run / "result.json").read_text())["structure"]
    assert structure["kept"]["vit.encoder.layers.encoder_layer_0.self_attention"] == [2, 4]
    assert structure["max_output_difference"] < 1e-5  # float32 masked vs removed
    assert structure["params_after"] < structure["params_before"]
    small = curvprune.load_pruned(run, fresh)
    attn = small.vit.encoder.layers[0].self_attention
    assert isinstance(attn, HeadPrunedMultiheadAttention) and attn.num_heads == 2
    with torch.no_grad():
        assert small(torch.randn(3, 64)).shape == (3, 10)
