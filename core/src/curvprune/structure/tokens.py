"""Token streams: the residual stream (hidden dim) of a Vision Transformer as one channel group.

Rules of the structure tracer (:class:`curvprune.structure.trace.Tracer` mixes them in). In
torchvision's ``VisionTransformer`` the hidden dim runs from the patch embedding (``conv_proj``)
through every block to the classifier; with these rules it is one coupled group, like a ResNet
stage stream:

* **A view with a literal channel count** (``x.reshape(n, self.hidden_dim, n_h * n_w)`` of a
  channel map: the channels stay on dim 1, the other dims merge or split): followed when the
  literal can follow the removal (:mod:`curvprune.structure.literals`: rewritten in a
  ``torch.fx.GraphModule``, else the one ``int`` attribute of the module whose code ran the
  node that equals it, set on removal); otherwise refused with the node named.
* **Parameters added to the channels** (``x + self.pos_embedding``, ``[1, T, C]``) and
  **concatenated beside them** along another dim (``torch.cat([self.class_token.expand(n, -1,
  -1), x], dim=1)``, a ``[1, 1, C]`` token; ``expand`` must keep the channel dim, ``-1``): the
  parameter's channel dim (aligned from the right, the last dim of channels-last tokens) holds
  the whole group, so it joins the group (``embeddings``). A removed channel's entries are
  masked with the structure (:meth:`curvprune.Structures.gate_masks`), gated with it
  (:func:`embedding_gates`) and sliced on removal; then the channel is exactly zero all along
  the stream, as after any producer. A buffer is refused (masks zero parameters only).
* **Token selection** (``x[:, 0]``, ``x[:, 1:]``) of channels-last tokens of known rank: int
  and slice indices on the dims before the channels; the channels pass.
* **Self-attention** (``nn.MultiheadAttention`` reading the channels as query, key and value):
  a consumer (``in_proj_weight``'s input columns) and a producer (``out_proj``'s rows and
  bias: a new element of ``embed_dim`` channels, coupled with the stream by the residual add).
  ``out_proj`` is not called as a module, so the element's gate multiplies the attention
  module's first output. Removal narrows ``embed_dim`` (``kdim``, ``vdim``) to the kept width
  and makes the module a :class:`~curvprune.structure.attention_mha.HeadPrunedMultiheadAttention`,
  whose inner width ``num_heads * head_dim`` (the heads) is independent of the stream. Query,
  key and value from different channels of the same layout are coupled (the packed projection
  reads them at the same columns); any other input (an untracked key, channels in a mask) is
  refused, and so is any variant the head rule refuses (:mod:`curvprune.structure.attention`).

The LayerNorms of the stream (``ln_1``, ``ln_2``, the encoder's ``ln``) are renormalised on
removal like ConvNeXt's (:mod:`curvprune.structure.norms`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.structure import trace_ops as ops
from curvprune.structure.attention import find_heads
from curvprune.structure.literals import resolve_literal
from curvprune.structure.trace_ops import OPAQUE, Cat, Chan, Param, chans

__all__ = ["TokenRules", "embedding_gates"]

_QKV = ("query", "key", "value")


class TokenRules:
    """Tracer rules for literal channel views, embedding parameters, token selection and
    self-attention (a mixin of :class:`curvprune.structure.trace.Tracer`)."""

    def init_token_rules(self) -> None:
        """Empty records; the traced model is the GraphModule until the caller sets it."""
        self.source: nn.Module = self.gm  # the traced model (graph.py sets the original)
        self.embeds: dict[int, list[tuple[str, int, tuple[int, ...]]]] = {}
        self.literals: dict[int, list[tuple[str, int, str, str, int]]] = {}
        self._head_reasons: dict[str, str | None] | None = None

    def visit_token_op(self, node: torch.fx.Node, args: Any, kwargs: Any, where: str,
                       mine: Any) -> Any:
        """The value of ``node`` if a rule of this module applies, else ``mine`` (the tracer's
        "not mine" marker)."""
        target = node.target
        method = target if node.op == "call_method" else None
        x = args[0] if args else None
        if method == "expand" and isinstance(x, Param) and not kwargs:
            sizes = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
            if len(sizes) != len(x.shape):
                return OPAQUE
            return Param(x.name, tuple(s if n == -1 else None
                                       for s, n in zip(x.shape, sizes, strict=True)))
        if target in ops.CAT:
            items = ops.arg(args, kwargs, 0, "tensors", ())
            if isinstance(items, (list, tuple)) and chans(items) \
                    and any(isinstance(i, Param) for i in items):
                return self.token_cat(node, list(items), ops.arg(args, kwargs, 1, "dim", 0),
                                      where)
        if target is operator.getitem and isinstance(x, (Chan, Cat)) and x.kind == "linear":
            return self.select_tokens(node, x, args[1], where)
        if (method in ops.VIEW_METHODS or target is torch.reshape) \
                and isinstance(x, (Chan, Cat)) and x.kind == "conv":
            shape = ops.arg(args, kwargs, 1, "shape", None) if target is torch.reshape \
                else args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) \
                else args[1:]
            shape = list(shape) if isinstance(shape, (tuple, list)) else []
            if len(shape) >= 3 and type(shape[1]) is int and shape[1] == self.total(x):
                return self.literal_view(node, x, shape, where)
        return mine

    # -- literal channel counts ---------------------------------------------------------------
    def literal_view(self, node: torch.fx.Node, x: Chan | Cat, shape: list[Any],
                     where: str) -> Any:
        """A view keeping the channels on dim 1 with their count written as a literal."""
        count = shape[1]
        head = f"{where} has the literal channel count {count}"
        if not isinstance(x, Chan) or x.lo or x.hi is not None or shape[0] == -1 \
                or self.dirty(x):
            self.bad(x, f"{head} of channels that are not one whole group after the batch dim")
            return OPAQUE
        if getattr(self, "rewritable", False):
            record = (node.name, 1, "", "", count)
        else:
            found = resolve_literal(self.gm.graph, self.source, node, count, shape)
            if isinstance(found, str):
                self.bad(x, f"{head}: {found} (a torch.fx.GraphModule's literal is rewritten)")
                return OPAQUE
            record = (node.name, 1, found[0], found[1], count)
        self.literals.setdefault(x.elem, []).append(record)
        return self.moved(node, x, 1, len(shape), where)

    # -- embedding parameters -----------------------------------------------------------------
    def embedding(self, node: torch.fx.Node, x: Any, param: Param, where: str) -> Any:
        """``x + param``: a parameter with one entry per channel on the channel dim joins the
        group (broadcast over the other dims: positions, tokens)."""
        if not isinstance(x, Chan):
            self.bad(x, f"{where} adds {param.name!r} to a concatenation")
            return OPAQUE
        if self.dirty(x):
            return OPAQUE
        rank = self.known_rank(x)
        if x.kind == "linear" and rank is not None and len(param.shape) > rank:
            why = f"of shape {list(param.shape)} to rank-{rank} tokens (it adds dims)"
        else:
            back = rank - 1 if x.kind == "conv" else 1
            why = self.join_embedding(x, param, len(param.shape) - back)
        if why:
            self.bad(x, f"{where} adds {param.name!r} {why}")
            return OPAQUE
        return attrs.evolve(x, chain=None)

    def token_cat(self, node: torch.fx.Node, items: list[Any], dim: Any, where: str) -> Any:
        """``torch.cat`` of channels with parameters along another dim (a class token)."""
        tracked = [i for i in items if isinstance(i, (Chan, Cat))]
        x = tracked[0]
        rank = self.known_rank(x) if isinstance(x, Chan) else None
        pos = (1 if x.kind == "conv" else (rank or 0) - 1)
        why = None
        if len(tracked) != 1 or rank is None or not all(
                isinstance(i, (Chan, Param)) for i in items):
            why = ("joins parameters with channels of unknown rank, a concatenation or "
                   "untracked tensors")
        elif not isinstance(dim, int) or not -rank <= dim < rank or dim % rank == pos:
            why = f"along dim {dim} joins parameters to the channels as new channels"
        for p in (i for i in items if isinstance(i, Param)):
            if why is None:
                why = self.join_embedding(x, p, pos) if len(p.shape) == rank else \
                    f"of rank {len(p.shape)}"
                why = f"with {p.name!r} {why}" if why else None
        if why or self.dirty(x):
            self.bad(x, f"{where} {why}" if why else f"{where} joins nonzero channels")
            return OPAQUE
        return attrs.evolve(x, chain=None)

    def join_embedding(self, x: Chan, param: Param, dim: int) -> str | None:
        """Record ``param``'s ``dim`` as the channels of ``x``'s group, or why not."""
        try:
            base = tuple(self.gm.get_parameter(param.name).shape)
        except AttributeError:
            return "(a buffer: masking cannot zero its removed channels)"
        if x.lo or x.hi is not None:
            return "to a chunk of the group's channels"
        if not 0 <= dim < len(param.shape) or param.shape[dim] != self.width(x):
            return (f"of shape {[s if s is not None else 'expanded' for s in param.shape]}, "
                    f"not one entry per channel on the channel dim")
        self.span(param.name, "embed", 0, x)
        self.embeds.setdefault(x.elem, []).append((param.name, dim, base))
        return None

    # -- token selection ----------------------------------------------------------------------
    def select_tokens(self, node: torch.fx.Node, x: Chan | Cat, index: Any, where: str) -> Any:
        """``x[:, 0]``, ``x[:, 1:]``: indexing the dims before the channels of tokens."""
        rank = self.known_rank(x)
        items = index if isinstance(index, tuple) else (index,)

        def plain(i: Any) -> bool:
            if isinstance(i, slice):
                return all(b is None or type(b) is int for b in (i.start, i.stop, i.step))
            return type(i) is int

        ok = rank is not None and all(plain(i) for i in items) and (
            len(items) < rank or (len(items) == rank and items[-1] == slice(None)))
        if not ok:
            self.bad(x, f"{where} is not handled (only int and slice indices of the dims "
                        "before the channels of tokens of known rank)")
            return OPAQUE
        new = rank - sum(type(i) is int for i in items)
        out = self.passed(node, x)
        if isinstance(out, Chan):
            return attrs.evolve(out, rank=new)
        return Cat(tuple((attrs.evolve(c, rank=new), o) for c, o in out.parts), out.kind)

    # -- self-attention -----------------------------------------------------------------------
    def head_refusal(self, name: str) -> str | None:
        """Why the head rule refuses attention module ``name`` (None when it does not)."""
        if self._head_reasons is None:
            self._head_reasons = {g.name: g.reason for g in find_heads(self.source)}
        return self._head_reasons.get(name)

    def visit_attention(self, node: torch.fx.Node, name: str, module: nn.Module, args: Any,
                        kwargs: Any) -> Any:
        """``nn.MultiheadAttention`` on the channels: a consumer and a producer (``out_proj``)."""
        qkv = [args[i] if i < len(args) else kwargs.get(k) for i, k in enumerate(_QKV)]
        rest = (args[3:], {k: v for k, v in kwargs.items() if k not in _QKV})
        if not chans((qkv, rest)):
            return OPAQUE
        label = f"MultiheadAttention {name!r}"
        why = self.head_refusal(name)
        q = qkv[0]
        if why is None and chans(rest):
            why = f"{label} takes channels in a mask argument"
        elif why is None and not all(isinstance(t, Chan) and t.kind == "linear"
                                     and self.same_channels(q, t) for t in qkv):
            why = (f"{label} reads query, key and value that are not channels of one layout "
                   "(cross-attention with an untracked tensor, a concatenation)")
        elif why is None and self.width(q) != module.embed_dim:
            why = f"{label} has embed_dim {module.embed_dim}, not the {self.width(q)} channels"
        out = f"{name}.out_proj"
        if why is None and out in self.produced:
            self.reasons[self.produced[out]].append(f"module {name!r} is called more than once")
            why = f"module {name!r} is called more than once"
        if why or self.dirty(qkv):
            self.bad((qkv, rest), why or f"{label} reads channels that are not zero when removed")
            return OPAQUE
        for t in qkv[1:]:
            q = self.joined(q, t)
        self.span(name, "in", 0, q)
        self.consumers[q.elem].append((name, 1, 0, q.lo, q.hi, q.step))
        elem, slot = self.new(module.embed_dim, out, "linear", 0)
        self.slots[slot][0] = name  # out_proj is not called as a module: gate the output
        self.produced[out] = elem
        return Chan(elem, "linear", slot, rank=self.known_rank(q)), OPAQUE


def embedding_gates(model: nn.Module, group: Any, values: Tensor, offset: int) -> list[Any]:
    """Multiply each embedding parameter of ``group`` by its structures' gate values on its
    channel dim while the handles live (0: the channel's entries zero, as masked).

    The gated tensor is computed at every forward of ``model`` (a forward pre-hook) and shadows
    the parameter on its owner module (an instance attribute, found before ``_parameters``),
    so any code reading it sees the gated value; parameters and the state dict are unchanged.
    """
    modules = dict(model.named_modules())
    slots = []
    for name, dim, shape in group.embeddings:
        path, _, attr = name.rpartition(".")
        slots.append((modules[path], attr, dim, len(shape)))

    def pre(module: nn.Module, inputs: Any) -> None:
        gate = group.expand(values[offset: offset + group.size])
        for owner, attr, dim, rank in slots:
            param = owner._parameters[attr]
            view = [1] * rank
            view[dim] = gate.numel()
            owner.__dict__[attr] = param * gate.to(param.dtype).view(view)

    def post(module: nn.Module, inputs: Any, output: Any) -> None:
        for owner, attr, _, _ in slots:
            owner.__dict__.pop(attr, None)

    return [model.register_forward_pre_hook(pre), model.register_forward_hook(post),
            _Unshadow(slots)]


class _Unshadow:
    """Drops gated values left on their owners (a forward that raised)."""

    def __init__(self, slots: Sequence[tuple[Any, ...]]) -> None:
        self.slots = slots

    def remove(self) -> None:
        for owner, attr, *_ in self.slots:
            owner.__dict__.pop(attr, None)
