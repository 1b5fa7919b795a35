"""Shape ops on channel values: permutes, transposes, sizes, layer-scale products, channel
concatenation and chunks.

Rules of the structure tracer (:class:`curvprune.structure.trace.Tracer` mixes them in). A
channel value knows where its channels are: dim 1 of a map (kind ``conv``, of a known rank)
or the last dim (kind ``linear``: a Linear's features, or a channels-last map). So:

* ``torch.permute(x, dims)``, ``x.permute(*dims)``, torchvision's ``Permute`` (traced
  through) and ``x.transpose(a, b)`` / ``torch.transpose`` of a map move the channel dim:
  to the last dim the value becomes ``linear`` (a Linear reads it, a ``LayerNorm((C,))``
  normalises it), to dim 1 a ``conv`` map of the permutation's rank. A permute that puts the
  channels anywhere else, or a transpose of a channels-last tensor of unknown rank, is refused.
* ``x.size()``, ``x.size(d)``, ``x.shape`` and ``x.shape[d] // g`` are followed as the
  tensor's own sizes (:class:`~curvprune.structure.trace_ops.Sizes`), so a view can tell
  sizes that follow a removal from literals that would be stale.
* ``param * x`` with a parameter read by a ``get_attr`` node: a per-channel scale (see
  :mod:`curvprune.structure.norms`).
* ``torch.split(x, [a, b, c], dim=1)`` and ``x.split(k, 1)`` on the channel dim hand each
  piece's readers a window of the group, like ``torch.chunk``; but the sizes are literals of
  the traced code, stale once channels go. Only a ``torch.fx.GraphModule`` (traced once, then
  pruned) has literals a removal can rewrite: there the pieces keep any sizes and
  :func:`rewrite_splits` sets each to its kept channels; in a plain module the group is
  refused with the node named.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import attrs
import torch

from curvprune.structure import trace_ops as ops
from curvprune.structure.shuffle import SHUFFLE_FUNCTIONS
from curvprune.structure.trace_ops import (
    OPAQUE,
    Cat,
    Chan,
    Grouped,
    Opaque,
    Param,
    Sizes,
    chans,
)

__all__ = ["NOT_MINE", "ShapeRules", "rewrite_splits"]

#: What :meth:`ShapeRules.visit_shape_op` returns for a node it leaves to the main rules.
NOT_MINE = object()

PERMUTE = frozenset({torch.permute})
TRANSPOSE = frozenset({torch.transpose, torch.swapaxes, torch.swapdims})
TRANSPOSE_METHODS = frozenset({"transpose", "swapaxes", "swapdims"})
SPLIT = frozenset({torch.split})


class ShapeRules:
    """Tracer rules for permutes, transposes, sizes, layer scales, ``torch.cat`` and
    ``torch.chunk`` (a mixin of :class:`curvprune.structure.trace.Tracer`)."""

    def rank_of(self, chan: Chan) -> int:
        """The tensor rank of a ``conv`` channel value (its own, else its element's)."""
        return chan.rank if chan.rank is not None else self.rank[chan.elem]

    def visit_shape_op(self, node: torch.fx.Node, args: Any, kwargs: Any, where: str) -> Any:
        """The value of ``node`` if it is a shape op on channels, else :data:`NOT_MINE`."""
        target = node.target
        method = target if node.op == "call_method" else None
        x = args[0] if args else None
        rest = list(args[1:]) + list(kwargs.values())
        if isinstance(x, Sizes):
            return self.sizes_op(target, x, args)
        if isinstance(x, Grouped):
            return self.grouped_op(node, x, args, kwargs, where)
        if not isinstance(x, (Chan, Cat)):
            if target in ops.MUL or method in ops.MUL_METHODS:
                if isinstance(x, Param) and len(args) == 2 and isinstance(args[1], (Chan, Cat)):
                    return self.layer_scale(node, args[1], x, where)
            return NOT_MINE
        if method == "size" and not kwargs:
            return Sizes(x) if len(args) == 1 else Sizes(x, args[1])
        if target is getattr and len(args) == 2 and args[1] == "shape":
            return Sizes(x)
        if (target in ops.MUL or method in ops.MUL_METHODS) and len(args) == 2 \
                and isinstance(args[1], Param):
            return self.layer_scale(node, x, args[1], where)
        if target in PERMUTE or method == "permute":
            dims = ops.arg(args, kwargs, 1, "dims", None)
            if method == "permute" and len(args) > 2:
                dims = args[1:]
            return self.permute(node, x, dims, where)
        if (method in ops.VIEW_METHODS or target is torch.reshape) and x.kind == "conv":
            packed = len(args) == 2 and isinstance(args[1], (tuple, list))
            shape = list(args[1] if packed or target is torch.reshape else args[1:])
            c = shape[1] if len(shape) > 1 else None
            if len(shape) >= 3 and shape[0] != -1 and isinstance(c, Sizes) and c.of is x \
                    and (c.dim, c.div) == (1, 1):  # [N, C, ...]: only the other dims change
                return self.moved(node, x, 1, len(shape), where)
            if len(shape) == self.rank_of(self.parts(x)[0][0]) + 1:
                return self.grouped_view(node, x, shape, where)
        if (target in ops.FLATTEN_FUNCTIONS or method == "flatten") and x.kind == "conv":
            start = ops.arg(args, kwargs, 1, "start_dim", 0)
            end = ops.arg(args, kwargs, 2, "end_dim", -1)
            rank = self.rank_of(self.parts(x)[0][0])
            if isinstance(start, int) and 2 <= start < rank and end in (-1, rank - 1):
                return self.moved(node, x, 1, start + 1, where)  # the spatial dims merge
        if (method == "mean" or target is torch.mean) and x.kind == "linear":
            return self.token_mean(node, x, args, kwargs, where)
        if target in SHUFFLE_FUNCTIONS:
            return self.shuffle(node, x, ops.arg(args, kwargs, 1, "groups", None), where)
        if (target in ops.CHUNK or method == "chunk") and isinstance(x, Cat):
            return self.chunk_cat(x, args, kwargs, where)
        if (target in SPLIT or method == "split") and isinstance(x, Chan):
            return self.split(node, x, args, kwargs, where)
        if target in SPLIT or method == "split":
            self.bad(x, f"{where} is not handled (a split of one layer's channels only, not of "
                        "a concatenation or shuffled channels)")
            return OPAQUE
        if target in TRANSPOSE or method in TRANSPOSE_METHODS:
            if any(isinstance(a, (Chan, Cat)) for a in rest):
                return NOT_MINE
            return self.transpose(node, x, ops.arg(args, kwargs, 1, "dim0", None),
                                  ops.arg(args, kwargs, 2, "dim1", None), where)
        return NOT_MINE

    def flatten(self, x: Any, where: str) -> Any:
        """``x`` flattened from dim 1 on: each channel a block of features (kind ``flat``)."""
        if not isinstance(x, (Chan, Cat)):
            return x
        if x.kind != "conv":
            self.bad(x, f"flatten at {where!r} of features that are not a channel map")
            return OPAQUE
        if isinstance(x, Cat):
            return Cat(tuple((attrs.evolve(c, kind="flat", chain=None), o) for c, o in x.parts),
                       "flat")
        return attrs.evolve(x, kind="flat", chain=None)

    def split(self, node: torch.fx.Node, x: Chan, args: Any, kwargs: Any, where: str) -> Any:
        """``torch.split`` on the channel dim: each piece a window of the group; the literal
        sizes are recorded for :func:`rewrite_splits` (refused outside a GraphModule)."""
        sizes = args[1] if len(args) > 1 else kwargs.get(
            "split_size_or_sections", kwargs.get("split_size"))
        dim = ops.arg(args, kwargs, 2, "dim", 0)
        rank = self.rank_of(x) if x.kind == "conv" else 1
        width = self.width(x)
        if isinstance(sizes, int) and sizes > 0:
            sizes = [min(sizes, width - i) for i in range(0, width, sizes)]
        channel_dim = dim in ((1, 1 - rank) if x.kind == "conv" else (-1,))
        if self.dirty(x) or x.kind == "flat" or not channel_dim \
                or not isinstance(sizes, (list, tuple)) \
                or not all(isinstance(n, int) and n >= 0 for n in sizes) or sum(sizes) != width:
            self.bad(x, f"{where} is not handled (only literal sizes on the channel dim)")
            return OPAQUE
        full = self.size[self.find(x.elem)]
        out, lo, windows = [], x.lo, []
        for n in sizes:
            hi = lo + n
            out.append(attrs.evolve(x, chain=None, lo=lo, hi=None if hi == full else hi))
            windows.append((lo, hi))
            lo = hi
        if not getattr(self, "rewritable", False):
            self.bad(x, f"{where} has literal sizes {list(sizes)} that a removal would leave "
                        "stale (a torch.fx.GraphModule's are rewritten)")
        self.splits.setdefault(x.elem, []).append((node.name, tuple(windows)))
        return tuple(out)

    def sizes_op(self, target: Any, x: Sizes, args: Any) -> Any:
        """An entry of a traced value's sizes, or an entry divided by a number; anything else
        made from the sizes is opaque (``torch.arange(x.size(1))`` must not pass as a
        constant: it would change with a removal)."""
        if target is operator.getitem and x.dim is None and isinstance(args[1], int):
            return Sizes(x.of, args[1])
        if target is operator.floordiv and x.dim is not None and isinstance(args[1], int) \
                and args[1] > 0:
            return Sizes(x.of, x.dim, x.div * args[1])
        return OPAQUE

    def permute(self, node: torch.fx.Node, x: Chan | Cat, dims: Any, where: str) -> Any:
        """Move the channel dim with a permutation of all dims."""
        rank = len(dims) if isinstance(dims, (list, tuple)) else 0
        ok = rank >= 2 and all(isinstance(d, int) for d in dims)
        perm = [d % rank for d in dims] if ok else []
        if not ok or sorted(perm) != list(range(rank)) or x.kind == "flat":
            self.bad(x, f"{where} is not handled (only a permutation of a channel map's or "
                        "channels-last tensor's dims)")
            return OPAQUE
        have = self.known_rank(x)
        if have is not None and have != rank:
            self.bad(x, f"{where} permutes {rank} dims of a rank-{have} tensor")
            return OPAQUE
        pos = 1 if x.kind == "conv" else rank - 1
        return self.moved(node, x, perm.index(pos), rank, where)

    def transpose(self, node: torch.fx.Node, x: Chan | Cat, a: Any, b: Any, where: str) -> Any:
        """Swap two dims of a channel map, or of channels-last features of known rank."""
        rank = self.known_rank(x)
        if x.kind == "flat" or rank is None or not isinstance(a, int) \
                or not isinstance(b, int):
            self.bad(x, f"{where} is not handled (a transpose of a channel map's dims, or of a "
                        "channels-last tensor's whose rank a permute or transpose told)")
            return OPAQUE
        if not (-rank <= a < rank and -rank <= b < rank):
            self.bad(x, f"{where} swaps dims outside a rank-{rank} tensor")
            return OPAQUE
        perm = list(range(rank))
        perm[a % rank], perm[b % rank] = perm[b % rank], perm[a % rank]
        return self.moved(node, x, perm.index(1 if x.kind == "conv" else rank - 1), rank, where)

    def known_rank(self, x: Chan | Cat) -> int | None:
        """The rank of a channel value: a map's, or channels-last features' when a permute,
        transpose or reshape told it (else None)."""
        first = self.parts(x)[0][0]
        if x.kind == "conv":
            return self.rank_of(first)
        return first.rank if x.kind == "linear" else None

    def token_mean(self, node: torch.fx.Node, x: Chan | Cat, args: Any, kwargs: Any,
                   where: str) -> Any:
        """``x.mean(dims)`` of channels-last features of known rank over dims other than the
        batch and the channels (a mean over tokens): the channels pass."""
        dims = ops.arg(args, kwargs, 1, "dim", None)
        keep = ops.arg(args, kwargs, 2, "keepdim", False)
        dims = (dims,) if isinstance(dims, int) else dims
        rank = self.known_rank(x)
        if rank is None or not dims or not all(
                isinstance(d, int) and -rank <= d < rank and 0 < d % rank < rank - 1
                for d in dims):
            return NOT_MINE
        out = self.passed(node, x)
        new = rank if keep else rank - len(set(d % rank for d in dims))
        if isinstance(out, Chan):
            return attrs.evolve(out, rank=new)
        return Cat(tuple((attrs.evolve(c, rank=new), o) for c, o in out.parts), out.kind)

    def moved(self, node: torch.fx.Node, x: Chan | Cat, pos: int, rank: int, where: str) -> Any:
        """``x`` with its channels now on dim ``pos`` of a rank-``rank`` tensor."""
        if pos == rank - 1:
            kind, new_rank = "linear", rank
        elif pos == 1 and rank >= 3:
            kind, new_rank = "conv", rank
        else:
            self.bad(x, f"{where} moves the channels to dim {pos} of {rank}")
            return OPAQUE
        out = self.passed(node, x)
        if isinstance(out, Chan):
            return attrs.evolve(out, kind=kind, rank=new_rank)
        return Cat(tuple((attrs.evolve(c, kind=kind, rank=new_rank), o) for c, o in out.parts),
                   kind)

    def cat(self, args: Any, kwargs: Any, where: str) -> Any:
        """``torch.cat`` of channel maps on the channel dim: each input at its offset."""
        items = ops.arg(args, kwargs, 0, "tensors", ())
        dim = ops.arg(args, kwargs, 1, "dim", 0)
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        touched = chans(items)
        if not touched:
            return OPAQUE if any(isinstance(i, Opaque) for i in items) else None
        ok = all(isinstance(i, (Chan, Cat)) and i.kind in ("conv", "linear") for i in items)
        kinds = {i.kind for i in items if isinstance(i, (Chan, Cat))}
        if ok and len(kinds) == 1:
            kind = kinds.pop()
            rank = self.rank_of(touched[0]) if kind == "conv" else 1
            ok = dim in ((1, 1 - rank) if kind == "conv" else (-1,))
            why = f"{where} along dim {dim}, not the channel dim"
        elif kinds == {"flat"}:
            ok, why = False, f"{where} joins flattened maps (features per channel unknown)"
        else:
            ok, why = False, f"{where} joins channels with an untracked tensor"
        if not ok or self.dirty(items):
            self.bad(touched, why)
            return OPAQUE
        parts, offset = [], 0
        for item in items:
            for chan, inner in self.parts(item):
                parts.append((attrs.evolve(chan, chain=None), offset + inner))
            offset += self.total(item)
        return Cat(tuple(parts), kind)

    def chunk(self, x: Chan, args: Any, kwargs: Any, where: str) -> Any:
        """``torch.chunk`` on the channel dim: each chunk holds a window of the group, and the
        group keeps the chunks equal (like a grouped conv's groups), so that the chunk sizes,
        computed from the tensor, still split at the same place after removal."""
        parts = ops.arg(args, kwargs, 1, "chunks", None)
        dim = ops.arg(args, kwargs, 2, "dim", 0)
        rank = self.rank_of(x) if x.kind == "conv" else 1
        width = self.width(x)
        channel_dim = dim in ((1, 1 - rank) if x.kind == "conv" else (-1,))
        if self.dirty(x) or x.kind == "flat" or not channel_dim or not isinstance(parts, int) \
                or parts < 1 or width % parts:
            self.bad(x, f"{where} is not handled (only equal chunks of the channel dim)")
            return OPAQUE
        full, step = self.size[self.find(x.elem)], width // parts
        need = 1
        out = []
        for j in range(parts):
            lo, hi = x.lo + j * step, x.lo + (j + 1) * step
            need = math.lcm(need, full // math.gcd(full, lo, hi))
            out.append(attrs.evolve(x, chain=None, lo=lo, hi=None if hi == full else hi))
        self.grouping[x.elem].append((need, f"{where} ({parts} chunks)"))
        return tuple(out)


def rewrite_splits(model: Any, splits: dict[str, tuple[tuple[int, int], ...]],
                   keep: dict[str, Any]) -> Any:
    """Check, then return a function that rewrites the literal sizes of ``torch.split`` nodes.

    ``splits`` maps a node name to its pieces' windows ``[lo, hi)`` in the channels of the
    group named in ``keep`` (``keep[node]``: bool per channel of that group): each piece's new
    size is its kept channels. Raises a one-line ``ValueError`` when ``model`` is not a
    GraphModule holding that node as a split of the recorded sizes.
    """
    nodes = {n.name: n for n in model.graph.nodes} if isinstance(
        model, torch.fx.GraphModule) else {}
    edits = []
    for name, windows in splits.items():
        node = nodes.get(name)
        old = [hi - lo for lo, hi in windows]
        if node is None or not (node.target in SPLIT or node.target == "split"):
            raise ValueError(f"torch.split at node {name!r} is not in the model's fx graph (a "
                             "plain module's literal split sizes cannot be rewritten)")
        pos = 1 if len(node.args) > 1 else None
        key = next((k for k in ("split_size_or_sections", "split_size") if k in node.kwargs),
                   None)
        value = node.args[1] if pos else node.kwargs.get(key)
        if isinstance(value, int):
            width = sum(old)
            value = [min(value, width - i) for i in range(0, width, value)]
        if list(value) != old:
            raise ValueError(f"torch.split at node {name!r} has sizes {value}, not the traced "
                             f"{old}: the model changed since")
        new = [int(keep[name][lo:hi].sum()) for lo, hi in windows]
        edits.append((node, pos, key, new))

    def apply() -> None:
        for node, pos, key, new in edits:
            if pos:
                node.args = (*node.args[:1], new, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, key: new}
        if edits:
            model.recompile()

    return apply
