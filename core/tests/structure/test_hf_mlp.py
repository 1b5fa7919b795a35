"""Hugging Face MLP hidden units as structures: masked units == removed units.

Ground truth: the same float64 model with the pruned units masked through
:class:`curvprune.MaskSet` (BERT's ``intermediate.dense`` rows and biases, GPT-2's ``c_proj``
rows, Llama's ``gate_proj``/``up_proj`` rows), every module at full width. Removal drops
exactly the zero contributions of the masked units; the down projections then sum fewer terms
in another order, so outputs agree to float64 round-off (~1e-14 relative); 1e-10 relative to
the output scale still catches any wrong row or column (differences of order 1). Removed
weights are also checked against the dense model's slices taken by hand.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import curvprune
from curvprune import (
    MaskSet,
    Pipeline,
    StructureGraph,
    StructureSkipWarning,
    UnsupportedModelError,
    apply_removal,
    remove_structures,
    select_parameters,
)
from curvprune.structure.attention import HeadGroup
from curvprune.structure.hf_mlp import MlpGroup, find_mlps

transformers = pytest.importorskip("transformers")

HOST = curvprune.get_plugin_manager(autoload=False)
TARGETS = ("Linear", "Conv1D")


def bert() -> nn.Module:
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=24, max_position_embeddings=16)).double().eval()


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_embd=16, n_layer=2, n_head=4, n_inner=24, n_positions=16,
        bos_token_id=0, eos_token_id=0)).double().eval()


def llama(bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=24, max_position_embeddings=16,
        mlp_bias=bias, bos_token_id=0, eos_token_id=0, pad_token_id=0)).double().eval()


BUILD = {"bert": bert, "gpt2": gpt2, "llama": llama}


def ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 50, (batch, length), generator=torch.Generator().manual_seed(1))


def run_of(kind: str):
    tokens = ids()
    if kind == "bert":
        mask = torch.ones_like(tokens)
        mask[1, 4:] = 0
        return lambda m: torch.cat([m(tokens).last_hidden_state,
                                    m(tokens, attention_mask=mask).last_hidden_state])
    return lambda m: m(tokens).logits


def structured(model: nn.Module):
    layout = select_parameters(model, TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = StructureGraph.trace(model, heads_fallback=True)
    return layout.with_structures(graph.structures(layout))


def masked_copy(model: nn.Module, layout, keep: torch.Tensor) -> nn.Module:
    sid = layout.structure_index()
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], torch.ones_like(sid).bool())
    twin = copy.deepcopy(model)
    MaskSet(layout, per_channel[layout.channel_index()]).with_extra(
        layout.structures.gate_masks(keep)).apply_(twin)
    return twin


def drop(layout, kind: type, drops: dict[int, list[int]]) -> torch.Tensor:
    """A keep-mask removing structures ``drops[i]`` of the i-th group of class ``kind``."""
    s = layout.structures
    keep = torch.ones(s.n_structures, dtype=torch.bool)
    chosen = [i for i, g in enumerate(s.groups) if isinstance(g, kind)]
    for i, local in drops.items():
        keep[s.offsets[chosen[i]] + torch.tensor(local)] = False
    return keep


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = max(1.0, float(b.abs().max()))
    assert float((a.detach() - b.detach()).abs().max()) <= 1e-10 * scale


def units(model: nn.Module, kind: str) -> list[int]:
    if kind == "bert":
        return [layer.intermediate.dense.out_features for layer in model.encoder.layer]
    if kind == "gpt2":
        return [block.mlp.c_fc.nf for block in model.transformer.h]
    return [layer.mlp.up_proj.out_features for layer in model.model.layers]


# --------------------------------------------------------------------------------------------
# Masked == removed
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_mlp_units_are_found_by_inspection(kind):
    model = BUILD[kind]()
    groups = find_mlps(model)
    assert [g.size for g in groups] == [24, 24] and all(g.removable for g in groups)
    graph = StructureGraph.trace(model, heads_fallback=True)
    assert graph.untraced
    assert sum(isinstance(g, MlpGroup) for g in graph.groups) == 2
    assert sum(isinstance(g, HeadGroup) for g in graph.groups) == 2
    layout = structured(model)
    assert sum(isinstance(g, MlpGroup) for g in layout.structures.groups) == 2


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_mlp_units_removed_equal_masked(kind):
    model = BUILD[kind]()
    run = run_of(kind)
    layout = structured(model)
    keep = drop(layout, MlpGroup, {0: [0, 5, 23], 1: list(range(1, 24))})
    keep &= drop(layout, HeadGroup, {1: [1]})  # heads and units in one removal
    masked = masked_copy(model, layout, keep)
    removed = copy.deepcopy(model)
    result = remove_structures(removed, layout.structures, keep)
    with torch.no_grad():
        dense_out, masked_out, removed_out = run(model), run(masked), run(removed)
    assert removed_out.shape == dense_out.shape
    assert_close(removed_out, masked_out)
    assert float((masked_out - dense_out).abs().max()) > 1e-6  # the units mattered
    assert result.params_after < result.params_before
    assert units(removed, kind) == [21, 1]
    kept = [i for i in range(24) if i not in (0, 5, 23)]
    if kind == "bert":
        a, b = model.encoder.layer[0], removed.encoder.layer[0]
        assert torch.equal(b.intermediate.dense.weight, a.intermediate.dense.weight[kept])
        assert torch.equal(b.intermediate.dense.bias, a.intermediate.dense.bias[kept])
        assert torch.equal(b.output.dense.weight, a.output.dense.weight[:, kept])
        assert b.output.dense.in_features == 21
    elif kind == "gpt2":
        a, b = model.transformer.h[0].mlp, removed.transformer.h[0].mlp
        assert torch.equal(b.c_fc.weight, a.c_fc.weight[:, kept])
        assert torch.equal(b.c_fc.bias, a.c_fc.bias[kept])
        assert torch.equal(b.c_proj.weight, a.c_proj.weight[kept])
        assert b.c_proj.nx == 21
        with torch.no_grad():  # generation through the cache still runs
            out = removed.generate(ids()[:1], max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 10)
    else:
        a, b = model.model.layers[0].mlp, removed.model.layers[0].mlp
        for p in ("gate_proj", "up_proj"):
            assert torch.equal(getattr(b, p).weight, getattr(a, p).weight[kept])
        assert torch.equal(b.down_proj.weight, a.down_proj.weight[:, kept])
        assert b.intermediate_size == 21 and b.down_proj.in_features == 21
    # a fresh model rebuilt from the kept indices loads the removed weights
    fresh = BUILD[kind]()
    apply_removal(fresh, result.kept_indices)
    fresh.load_state_dict(removed.state_dict())
    with torch.no_grad():
        assert torch.equal(run(fresh), run(removed))


def test_llama_mlp_biases_are_masked_and_removed():
    model = llama(bias=True)
    nn.init.normal_(model.model.layers[0].mlp.up_proj.bias)
    nn.init.normal_(model.model.layers[0].mlp.gate_proj.bias)
    run = run_of("llama")
    layout = structured(model)
    keep = drop(layout, MlpGroup, {0: [1, 2, 3]})
    masked = masked_copy(model, layout, keep)
    removed = copy.deepcopy(model)
    remove_structures(removed, layout.structures, keep)
    with torch.no_grad():
        assert_close(run(removed), run(masked))
    assert removed.model.layers[0].mlp.up_proj.bias.shape == (21,)


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_mlp_gates_are_exact(kind):
    """A zero gate is the unit removed; gates of 1 leave the model unchanged."""
    model = BUILD[kind]()
    run = run_of(kind)
    layout = structured(model)
    s = layout.structures
    keep = drop(layout, MlpGroup, {0: [3, 4], 1: [0]})
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
# Through the pipeline
# --------------------------------------------------------------------------------------------
def pipeline(sparsity: float, **mask) -> Pipeline:
    return Pipeline.from_config({
        "prune": {"sparsity": sparsity, "loss_samples": 0, "targets": list(TARGETS)},
        "scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
        "mask": {"name": "channel", **mask},
    }, host=HOST)


def counts(model: nn.Module) -> tuple[int, int]:
    """Parameters of the attention modules and of the MLPs."""
    def part(n: str) -> str:
        if "attn" in n or "attention" in n:
            return "heads"
        if "mlp" in n or "intermediate" in n or "output.dense" in n:
            return "mlp"
        return "other"

    total = {"heads": 0, "mlp": 0, "other": 0}
    for n, p in model.named_parameters():
        total[part(n)] += p.numel()
    return total["heads"], total["mlp"]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_pipeline_prunes_heads_and_mlp_units(kind):
    model = BUILD[kind]()
    run = run_of(kind)
    with torch.no_grad():
        shape = run(model).shape
    heads_before, mlp_before = counts(model)
    pipe = pipeline(0.5)
    with pytest.warns(StructureSkipWarning, match="attention heads and Hugging Face MLP"):
        result = pipe.prune(model, None)
    removal = pipe.remove(model, result.masks)
    assert removal.params_after < removal.params_before
    heads_after, mlp_after = counts(model)
    assert heads_after < heads_before and mlp_after < mlp_before
    assert any(u < 24 for u in units(model, kind))
    with torch.no_grad():
        assert run(model).shape == shape


@pytest.mark.parametrize("scope", ["layerwise", "global"])
def test_min_channels_keeps_a_unit_per_mlp(scope):
    model = gpt2()
    pipe = pipeline(0.99, scope=scope, min_channels=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = pipe.prune(model, None)
    pipe.remove(model, result.masks)
    assert units(model, "gpt2") == [1, 1]
    assert [block.attn.num_heads for block in model.transformer.h] == [1, 1]
    with torch.no_grad():
        assert model(ids()).logits.shape == (2, 7, 50)


# --------------------------------------------------------------------------------------------
# Refusals: one line naming the module
# --------------------------------------------------------------------------------------------
def test_bert_activation_not_zero_at_zero_is_refused():
    model = bert()
    model.encoder.layer[0].intermediate.intermediate_act_fn = nn.Sigmoid()
    groups = find_mlps(model)
    assert [g.removable for g in groups] == [False, True]
    assert "encoder.layer.0" in groups[0].reason and "0 to 0" in groups[0].reason
    assert "\n" not in groups[0].reason
    layout = structured(model)
    keep = torch.ones(layout.structures.n_structures, dtype=torch.bool)
    with pytest.raises(UnsupportedModelError, match="encoder.layer.0.intermediate"):
        apply_removal(model, {"encoder.layer.0.intermediate": [0]})
    assert units(model, "bert") == [24, 24]  # untouched
    remove_structures(model, layout.structures, keep)  # the refused group is not chosen


def test_unknown_mlp_variant_is_refused():
    model = llama()
    model.model.layers[1].mlp.norm = nn.LayerNorm(24)
    (ok, bad) = find_mlps(model)
    assert ok.removable and not bad.removable
    assert "model.layers.1.mlp" in bad.reason and "norm" in bad.reason


def test_plan_counts_mlp_groups_in_units():
    from curvprune.cli import _channel_groups

    groups = {g["name"]: g for g in _channel_groups(structured(gpt2()))}
    assert groups["transformer.h.0.mlp"]["unit"] == "units"
    assert groups["transformer.h.0.mlp"]["size"] == 24
    assert groups["transformer.h.0.mlp"]["status"] == "prunable"
    assert groups["transformer.h.0.attn"]["unit"] == "heads"


def test_mlp_units_prune_when_no_attention_module_is_recognised():
    """The fallback graph needs one removable inspected group, a head group or an MLP."""
    model = gpt2()
    for block in model.transformer.h:
        block.attn.q_norm = nn.Identity()  # a variant the head rule refuses
    graph = StructureGraph.trace(model, heads_fallback=True)
    assert [g.removable for g in graph.groups] == [False, True, False, True]
    pipe = pipeline(0.5, scope="layerwise")
    with pytest.warns(StructureSkipWarning, match="attention heads and Hugging Face MLP"):
        result = pipe.prune(model, None)
    pipe.remove(model, result.masks)
    assert units(model, "gpt2") == [12, 12]
    with torch.no_grad():
        assert model(ids()).logits.shape == (2, 7, 50)
