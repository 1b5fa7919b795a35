"""Attention heads as structures: a head's q/k/v rows and out-projection columns go together.

A **head group** (:class:`HeadGroup`) is one attention module; its structures are its heads
(with grouped-query attention, its key/value heads, each with the query heads that read it).
Removing a head slices, together, the head's rows of the query, key and value projections
(and biases) and the head's input columns of the output projection, and updates the module's
head count. Removing heads never changes the module's input and output width (the residual
stream), so a head group is local to its module: it is found by inspecting the module, not by
the fx walk, and the recognised modules are fx leaves (:func:`is_attention`). The stream of a
traced ``nn.MultiheadAttention`` is a channel group of its own, independent of the heads
(:mod:`curvprune.structure.tokens`).

Recognised layouts (anything else that looks like attention is a refused group, its reason
naming the module):

* ``nn.MultiheadAttention`` (packed ``in_proj_weight`` ``[3E, E]``, ``batch_first`` either
  way): head h is rows ``k·E + h·d .. k·E + (h+1)·d`` for q, k, v (``copies = 3``); on removal
  the module becomes a :class:`~curvprune.structure.attention_mha.HeadPrunedMultiheadAttention`
  (same parameters and keys; the stock forward ties the inner width to ``embed_dim``). Refused:
  ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` other than ``embed_dim``, subclasses.
* Hugging Face ``BertAttention`` (``self.query/key/value``, ``output.dense``):
  ``num_attention_heads`` and ``all_head_size`` follow.
* Hugging Face ``GPT2Attention`` (``c_attn``, a ``Conv1D`` packing q, k, v along its output
  dim, so a head spans three column slices; ``c_proj``): ``num_heads`` and ``split_size``
  follow. Refused: cross-attention (``q_attn``).
* Hugging Face ``LlamaAttention`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``): with
  grouped-query attention (``num_key_value_heads < num_attention_heads``) a structure is one
  key/value head and its ``num_key_value_groups`` query heads, so the grouping stays
  uniform; rotary embeddings need ``head_dim`` unchanged, so only whole heads go. The shared
  config is left alone (the forward infers the head count from the tensors).

**Masking** a structure zeroes its rows in the layout and the matching biases
(:meth:`HeadGroup.bias_rows`). With Linear projections the rows are the head's q, k and v
rows: its value rows and bias are then zero, so the head outputs exactly zero (its attention
weights become uniform, which does not matter). For GPT-2 the layout's rows of ``c_attn``
(a ``Conv1D``, ``[in, out]``) are input features, so a head's rows are those of ``c_proj``,
the head's inputs to the output projection: zeroing them removes the head's contribution
exactly. Either way the masked model computes what the smaller one does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError, UnsupportedModelError
from curvprune.structure.attention_mha import HeadPrunedMultiheadAttention, swap_in
from curvprune.structure.groups import ChannelGroup

__all__ = ["HeadGroup", "find_heads", "head_gates", "head_slices", "is_attention",
           "plan_head_removal"]

#: Hugging Face attention classes recognised by name (any class in the module's MRO).
_HF_STYLES = {"BertAttention": "bert", "GPT2Attention": "gpt2", "LlamaAttention": "llama"}
#: Submodules each style may have (anything else is a variant the rule does not know).
_KNOWN_CHILDREN = {
    "bert": {"self", "output"},
    "bert.self": {"query", "key", "value", "dropout", "distance_embedding"},
    "bert.output": {"dense", "LayerNorm", "dropout"},
    "gpt2": {"c_attn", "c_proj", "attn_dropout", "resid_dropout"},
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj"},
}
_HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
#: Layers whose fast path bypasses the attention module's forward (refused).
_FUSED_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


@attrs.frozen
class HeadGroup(ChannelGroup):
    """The heads of one attention module, pruned as structures (see the module docstring).

    ``size`` is the number of structures: heads, or key/value heads with grouped-query
    attention (each with ``per`` query heads). ``producers`` holds the attention module.

    Attributes:
        style: ``mha``, ``bert``, ``gpt2``, ``llama``, or ``unknown`` (a refused module).
        head_dim: features per head (unchanged by removal).
        per: query heads per structure (``num_key_value_groups``; 1 without GQA).
        rows: ``(parameter, unit, copies)``: the layout rows of each structure: structure s
            owns rows ``k·size·unit + s·unit + j`` for ``k < copies``, ``j < unit``.
        biases: the same for the biases masked with the rows.
    """

    style: str = "unknown"
    head_dim: int = 0
    per: int = 1
    rows: tuple[tuple[str, int, int], ...] = ()
    biases: tuple[tuple[str, int, int], ...] = ()

    def weights(self) -> tuple[str, ...]:
        """The parameters whose rows are this group's structures (all must be selected)."""
        return tuple(p for p, _, _ in self.rows)

    def layout_rows(self) -> list[tuple[str, Tensor]]:
        """``(parameter, structure id of each of its rows)`` for every row parameter."""
        return [(p, _ids(self.size, unit, copies)) for p, unit, copies in self.rows]

    def bias_rows(self) -> list[tuple[str, Tensor]]:
        """``(bias, structure id of each entry)`` for the biases masked with the rows."""
        return [(p, _ids(self.size, unit, copies)) for p, unit, copies in self.biases]

    def to_json(self) -> dict[str, Any]:
        """The group as plain JSON values, with its head layout."""
        return {**super().to_json(), "style": self.style, "head_dim": self.head_dim,
                "heads_per_structure": self.per}


def _ids(size: int, unit: int, copies: int) -> Tensor:
    return torch.arange(size).repeat_interleave(unit).repeat(copies)


def _rows(index: Tensor, size: int, unit: int, copies: int) -> Tensor:
    """The rows of the kept structures ``index`` (ascending), for ``copies`` slices."""
    within = (index[:, None] * unit + torch.arange(unit)[None, :]).reshape(-1)
    return (torch.arange(copies)[:, None] * (size * unit) + within[None, :]).reshape(-1)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _hf_style(module: nn.Module) -> str | None:
    if not type(module).__module__.startswith("transformers."):
        return None
    for cls in type(module).__mro__:
        if cls.__name__ in _HF_STYLES:
            return _HF_STYLES[cls.__name__]
    return None


def is_attention(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module this file describes (an fx leaf)."""
    return isinstance(module, nn.MultiheadAttention) or _hf_style(module) is not None


def _looks_like_attention(module: nn.Module) -> bool:
    """An attention module of a layout not recognised: named so, with a head count."""
    return "Attention" in type(module).__name__ and any(
        isinstance(getattr(module, a, None), int) for a in _HEAD_COUNTS)


# --------------------------------------------------------------------------------------------
# Finding the head groups
# --------------------------------------------------------------------------------------------
def find_heads(model: nn.Module) -> tuple[HeadGroup, ...]:
    """A :class:`HeadGroup` per attention module of ``model``, in module order.

    Modules inside a recognised one are not visited again; an attention-like module of an
    unknown layout (a class named ``*Attention*`` with a head count) is a refused group.
    """
    out: list[HeadGroup] = []
    taken: list[str] = []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if any(name.startswith(t + ".") or t == "" for t in taken):
            continue
        parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "") if name else None
        if isinstance(module, nn.MultiheadAttention) and isinstance(parent, _FUSED_LAYERS):
            out.append(_refused(name, module, "mha", (
                f"MultiheadAttention {name!r} sits in a {type(parent).__name__}, whose "
                "inference fast path runs a fused kernel that needs num_heads·head_dim = "
                "embed_dim")))
        elif is_attention(module):
            style = "mha" if isinstance(module, nn.MultiheadAttention) else _hf_style(module)
            out.append(_describe(name, module, str(style)))
        elif _looks_like_attention(module):
            out.append(_refused(name, module, "unknown", (
                f"attention module {name or type(module).__name__!r} "
                f"({type(module).__name__}) has a layout the head rule does not know "
                "(supported: nn.MultiheadAttention and Hugging Face BertAttention, "
                "GPT2Attention, LlamaAttention)")))
        else:
            continue
        taken.append(name)
    return tuple(out)


def _refused(name: str, module: nn.Module, style: str, reason: str) -> HeadGroup:
    heads = next((getattr(module, a) for a in _HEAD_COUNTS
                  if isinstance(getattr(module, a, None), int)), 0)
    return HeadGroup(name=name, size=int(heads), producers=(name,), norms=(), consumers=(),
                     coupled=False, removable=False, reason=reason, channel_dim=-1,
                     style=style)


def _unknown_children(name: str, module: nn.Module, key: str) -> str | None:
    extra = sorted(set(dict(module.named_children())) - _KNOWN_CHILDREN[key])
    if extra:
        return (f"attention module {name!r} ({type(module).__name__}) has submodules the head "
                f"rule does not know ({', '.join(extra)})")
    return None


def _describe(name: str, module: nn.Module, style: str) -> HeadGroup:
    """The head group of one recognised module, or a refused one with the reason."""
    label = f"{type(module).__name__} {name or '<model>'!r}"
    try:
        spec = {"mha": _mha, "bert": _bert, "gpt2": _gpt2, "llama": _llama}[style](name, module)
    except _Refusal as exc:
        return _refused(name, module, style, f"{label}: {exc}")
    size, head_dim, per, rows, biases = spec
    return HeadGroup(name=name, size=size, producers=(name,), norms=(), consumers=(),
                     coupled=False, removable=True, channel_dim=-1, style=style,
                     head_dim=head_dim, per=per, rows=rows, biases=biases)


class _Refusal(Exception):
    """A recognised module in a variant the head rule does not handle."""


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise _Refusal(why)


Spec = tuple[int, int, int, tuple[tuple[str, int, int], ...], tuple[tuple[str, int, int], ...]]


def _mha(name: str, m: nn.Module) -> Spec:
    _need(type(m) in (nn.MultiheadAttention, HeadPrunedMultiheadAttention),
          "a subclass of nn.MultiheadAttention (its forward is not known)")
    _need(bool(m._qkv_same_embed_dim), "kdim/vdim differ from embed_dim (separate q, k, v "
                                       "projections) is not handled")
    _need(m.bias_k is None, "add_bias_kv (per-head key/value biases) is not handled")
    _need(not m.add_zero_attn, "add_zero_attn is not handled")
    heads, dim = int(m.num_heads), int(m.head_dim)
    _need(m.in_proj_weight.shape[0] == 3 * heads * dim,
          f"in_proj_weight has {m.in_proj_weight.shape[0]} rows, not 3·{heads}·{dim}")
    rows = ((_join(name, "in_proj_weight"), dim, 3),)
    biases = ((_join(name, "in_proj_bias"), dim, 3),) if m.in_proj_bias is not None else ()
    return heads, dim, 1, rows, biases


def _bert(name: str, m: nn.Module) -> Spec:
    for key, mod in (("bert", m), ("bert.self", getattr(m, "self", None)),
                     ("bert.output", getattr(m, "output", None))):
        _need(isinstance(mod, nn.Module), f"no {key.split('.')[-1]!r} submodule")
        why = _unknown_children(name, mod, key)
        _need(why is None, str(why))
    attn = m.self
    heads, dim = int(attn.num_attention_heads), int(attn.attention_head_size)
    linears = [getattr(attn, p, None) for p in ("query", "key", "value")]
    dense = getattr(m.output, "dense", None)
    _need(all(isinstance(x, nn.Linear) and x.out_features == heads * dim for x in linears)
          and isinstance(dense, nn.Linear) and dense.in_features == heads * dim
          and attn.all_head_size == heads * dim,
          f"query/key/value/output.dense are not Linear layers of {heads}·{dim} features")
    rows = tuple((_join(name, f"self.{p}.weight"), dim, 1) for p in ("query", "key", "value"))
    biases = tuple((_join(name, f"self.{p}.bias"), dim, 1) for p, x in
                   zip(("query", "key", "value"), linears, strict=True) if x.bias is not None)
    return heads, dim, 1, rows, biases


def _gpt2(name: str, m: nn.Module) -> Spec:
    _need(not getattr(m, "is_cross_attention", False) and not hasattr(m, "q_attn"),
          "cross-attention (q_attn) is not handled")
    why = _unknown_children(name, m, "gpt2")
    _need(why is None, str(why))
    heads, dim = int(m.num_heads), int(m.head_dim)
    inner = heads * dim
    _need(m.split_size == inner and tuple(m.c_attn.weight.shape)[1] == 3 * inner
          and tuple(m.c_proj.weight.shape)[0] == inner,
          f"c_attn/c_proj are not Conv1D layers of 3·{inner} and {inner} features")
    return heads, dim, 1, ((_join(name, "c_proj.weight"), dim, 1),), ()


def _llama(name: str, m: nn.Module) -> Spec:
    why = _unknown_children(name, m, "llama")
    _need(why is None, str(why))
    q, k, v, o = (getattr(m, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    _need(all(isinstance(x, nn.Linear) for x in (q, k, v, o)),
          "q_proj/k_proj/v_proj/o_proj are not Linear layers")
    dim, per = int(m.head_dim), int(m.num_key_value_groups)
    kv = k.out_features // dim
    _need(k.out_features == v.out_features == kv * dim and q.out_features == kv * per * dim
          and o.in_features == q.out_features,
          f"the projections do not hold {kv}·{per} query and {kv} key/value heads of {dim}")
    units = {"q_proj": per * dim, "k_proj": dim, "v_proj": dim}
    rows = tuple((_join(name, f"{p}.weight"), u, 1) for p, u in units.items())
    biases = tuple((_join(name, f"{p}.bias"), u, 1) for p, u in units.items()
                   if getattr(m, p).bias is not None)
    return kv, dim, per, rows, biases


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------
def head_slices(group: HeadGroup,
                module: nn.Module) -> list[tuple[nn.Module, str, int, int, int]]:
    """``(owner, parameter, axis, unit, copies)`` of every parameter that removing heads of
    ``group`` (its attention ``module``) slices: along ``axis``, structure ``s`` owns entries
    ``k·size·unit + s·unit + j`` for ``k < copies``, ``j < unit``. A parameter the module does
    not have (no bias) is left out: what a head's removal deletes, for the removal and for
    the group saliencies."""
    dim, per = group.head_dim, group.per
    if group.style == "mha":
        cuts = [(module, "in_proj_weight", 0, dim, 3), (module, "in_proj_bias", 0, dim, 3),
                (module.out_proj, "weight", 1, dim, 1)]
    elif group.style == "bert":
        cuts = [(getattr(module.self, p), what, 0, dim, 1)
                for p in ("query", "key", "value") for what in ("weight", "bias")]
        cuts.append((module.output.dense, "weight", 1, dim, 1))
    elif group.style == "gpt2":
        cuts = [(module.c_attn, "weight", 1, dim, 3), (module.c_attn, "bias", 0, dim, 3),
                (module.c_proj, "weight", 0, dim, 1)]
    else:  # llama
        cuts = [(getattr(module, p), what, 0, unit, 1)
                for p, unit in (("q_proj", per * dim), ("k_proj", dim), ("v_proj", dim))
                for what in ("weight", "bias")]
        cuts.append((module.o_proj, "weight", 1, per * dim, 1))
    return [c for c in cuts if getattr(c[0], c[1], None) is not None]


def plan_head_removal(group: HeadGroup, index: Tensor,
                      modules: Mapping[str, nn.Module]) -> Callable[[], None]:
    """Check the removal of every structure of ``group`` not in ``index`` (kept, ascending)
    and compute the new tensors; the returned callable swaps them in.

    Raises:
        UnsupportedModelError: the group is refused, or the module changed since the trace.
    """
    if not group.removable:
        raise UnsupportedModelError(
            f"cannot remove heads of attention module {group.name!r}: {group.reason} @ model")
    module = modules.get(group.name)
    if module is None or (_describe(group.name, module, group.style).size != group.size):
        raise UnsupportedModelError(
            f"attention module {group.name!r} is not in the model or its heads changed since "
            "the trace @ model")
    index = index.cpu()
    kept = int(index.numel())
    dim, per = group.head_dim, group.per
    cuts = [(owner, param, axis, _rows(index, group.size, unit, copies))
            for owner, param, axis, unit, copies in head_slices(group, module)]
    attrs_after: list[tuple[nn.Module, str, int]] = []
    if group.style == "mha":
        attrs_after += [(module, "num_heads", kept), (module.out_proj, "in_features", kept * dim)]
    elif group.style == "bert":
        attrs_after += [(getattr(module.self, p), "out_features", kept * dim)
                        for p in ("query", "key", "value")]
        attrs_after += [(module.output.dense, "in_features", kept * dim),
                        (module.self, "num_attention_heads", kept),
                        (module.self, "all_head_size", kept * dim)]
    elif group.style == "gpt2":
        attrs_after += [(module.c_attn, "nf", 3 * kept * dim), (module.c_proj, "nx", kept * dim),
                        (module, "num_heads", kept), (module, "split_size", kept * dim)]
    else:  # llama
        attrs_after += [(getattr(module, p), "out_features", kept * unit)
                        for p, unit in (("q_proj", per * dim), ("k_proj", dim), ("v_proj", dim))]
        attrs_after.append((module.o_proj, "in_features", kept * per * dim))
    new = [(owner, param, getattr(owner, param), getattr(owner, param).detach()
            .index_select(axis, rows.to(getattr(owner, param).device)).clone())
           for owner, param, axis, rows in cuts]

    def apply() -> None:
        for owner, param, old, value in new:
            setattr(owner, param, nn.Parameter(value, requires_grad=old.requires_grad))
        for owner, attr, value in attrs_after:
            setattr(owner, attr, value)
        if group.style == "mha":
            swap_in(module)

    return apply


# --------------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------------
class _Restore:
    """A handle undoing a temporary per-head gate on a ``nn.MultiheadAttention``."""

    def __init__(self, module: nn.Module, cls: type) -> None:
        self.module, self.cls = module, cls

    def remove(self) -> None:
        self.module._head_gate = None
        del self.module._head_gate
        self.module.__class__ = self.cls


def head_gates(group: HeadGroup, modules: Mapping[str, nn.Module], values: Tensor,
               offset: int) -> list[Any]:
    """Multiply each structure's heads by ``values[offset + s]`` while the handles live.

    The gate scales the head's value vectors (for ``nn.MultiheadAttention``, the head's output
    before the output projection): 0 is the head removed, 1 the model unchanged. Returns
    handles with ``remove()``.
    """
    module = modules.get(group.name)
    if module is None:
        raise ConfigError(f"attention module {group.name!r} is not in the model @ structures")
    size, dim = group.size, group.head_dim
    gate = values[offset: offset + size]
    if group.style == "mha":
        old = swap_in(module)
        module._head_gate = gate.repeat_interleave(group.per)
        return [_Restore(module, old)]
    if group.style == "bert":
        target, at = module.self.value, 0
    elif group.style == "gpt2":
        target, at = module.c_attn, 2 * size * dim
    else:
        target, at = module.v_proj, 0

    def hook(mod: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        scale = gate.repeat_interleave(dim).to(output.dtype)
        width = output.shape[-1]
        ones = torch.ones(width, dtype=scale.dtype, device=scale.device)
        scale = torch.cat([ones[:at], scale, ones[at + scale.numel():]])
        return output * scale

    return [target.register_forward_hook(hook)]
