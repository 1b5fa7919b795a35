"""Channel shuffles and equal cuts of interleaved channels (rules of the structure tracer).

A **channel shuffle** with ``g`` groups (ShuffleNet: ``x.view(n, g, C // g, h, w)``,
``transpose(1, 2)``, ``view(n, C, h, w)``; ``nn.ChannelShuffle``; ``F.channel_shuffle``)
moves input channel ``r·m + q`` (row ``r`` of ``g`` rows of ``m = C / g``) to position
``q·g + r``. The tracer follows it exactly: each piece of the input lands at an offset with a
stride (``Chan.step``), so the readers of the shuffled map (a conv, a BatchNorm, a depthwise
conv, a flatten) get the group's channels at strided places.

After a removal the shuffle runs on the kept channels with the same ``g``: it maps them as
before only if **every row keeps the same slots** (then kept slot ``q`` of row ``r`` still goes
next to kept slot ``q`` of the other rows). The tracer therefore ties position ``q`` of every
row to position ``q`` of row 0, as the same structure:

* rows holding the same window of one element (a shuffle of one conv's output): a grouping
  constraint, like a grouped conv's (``copies``);
* rows holding same-width windows of different elements at the same places (a shuffle of
  ``cat([a, b])``, the first unit of a ShuffleNetV2 stage): the elements are coupled;
* rows laid out differently (ShuffleNetV2's later units shuffle ``cat([half of the previous
  shuffle, new map])``: one row interleaves two windows, the other is one map) would need a
  structure to hold channel ``q`` of one element and channels ``2q``, ``2q + 1`` of another,
  which a channel group (one numbering for all its producers) cannot express: refused, the
  node named.

``torch.chunk`` of interleaved channels (the split half of a ShuffleNetV2 unit) uses the same
rows: each chunk is a row, and the chunks keep the same slots so they stay equal.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from curvprune.structure import trace_ops as ops
from curvprune.structure.trace_ops import OPAQUE, Cat, Chan, Grouped, Sizes

__all__ = ["SHUFFLE_FUNCTIONS", "ShuffleRules"]

SHUFFLE_FUNCTIONS = frozenset(f for f in (
    getattr(torch, "channel_shuffle", None), getattr(F, "channel_shuffle", None),
    getattr(torch, "native_channel_shuffle", None)) if f is not None)

Row = list[tuple[Chan, int]]


class ShuffleRules:
    """Tracer rules for channel shuffles and chunks of concatenated or shuffled channels (a
    mixin of :class:`curvprune.structure.trace.Tracer`)."""

    def rows(self, x: Chan | Cat, k: int) -> list[Row]:
        """The pieces of ``x`` in each of ``k`` equal rows of its channel positions, as
        ``(window, offset in the row)`` sorted by offset."""
        m = self.total(x) // k
        out: list[Row] = [[] for _ in range(k)]
        for chan, offset in self.parts(x):
            width, step = self.width(chan), chan.step
            full = self.size[self.find(chan.elem)]
            for r in range(k):
                i0 = max(0, -((offset - r * m) // step))
                i1 = min(width, -((offset - (r + 1) * m) // step))
                if i0 < i1:
                    hi = chan.lo + i1
                    piece = attrs.evolve(chan, chain=None, lo=chan.lo + i0,
                                         hi=None if hi == full else hi)
                    out[r].append((piece, offset + step * i0 - r * m))
        return [sorted(row, key=lambda p: p[1]) for row in out]

    def tie_rows(self, rows: list[Row], where: str) -> str | None:
        """Make position q of every row the same structure as position q of row 0; the reason
        it cannot, else None (nothing is tied then)."""
        unions, grouping = [], []
        for row in rows[1:]:
            if len(row) != len(rows[0]):
                return "its rows hold channels laid out differently"
            for (a, oa), (b, ob) in zip(rows[0], row, strict=True):
                wa = self.width(a)
                if oa != ob or a.step != b.step or wa != self.width(b) or a.kind != b.kind:
                    return "its rows hold channels laid out differently"
                ra, rb = self.find(a.elem), self.find(b.elem)
                if ra != rb:
                    if self.size[ra] != self.size[rb] or a.lo != b.lo:
                        return "its rows hold different windows of different layers"
                    unions.append((a.elem, b.elem))
                elif a.lo != b.lo:
                    full = self.size[ra]
                    grouping.append((a.elem, full // math.gcd(full, b.lo - a.lo)))
        for a, b in unions:
            self.union(a, b)
        for elem, parts in grouping:
            self.grouping[elem].append((parts, f"{where} (equal slots in its rows)"))
        return None

    def shuffle(self, node: torch.fx.Node, x: Any, groups: Any, where: str) -> Any:
        """A channel shuffle of ``x`` with ``groups`` rows."""
        if not isinstance(x, (Chan, Cat)):
            return x
        total = self.total(x)
        if self.dirty(x) or x.kind != "conv" or not isinstance(groups, int) or groups < 1 \
                or total % groups:
            self.bad(x, f"{where} is not handled (a channel shuffle of a channel map into "
                        f"{groups} equal groups)")
            return OPAQUE
        rows = self.rows(x, groups)
        why = self.tie_rows(rows, where)
        if why:
            self.bad(x, f"{where} (a channel shuffle into {groups} groups): {why}, so no "
                        "removal keeps its rows aligned")
            return OPAQUE
        parts = sorted(((attrs.evolve(c, step=c.step * groups), o * groups + r)
                        for r, row in enumerate(rows) for c, o in row), key=lambda p: p[1])
        return Cat(tuple(parts), x.kind)

    def chunk_cat(self, x: Cat, args: Any, kwargs: Any, where: str) -> Any:
        """``torch.chunk`` of a concatenation or of shuffled channels: each chunk a row, the
        chunks kept equal by tying their slots."""
        parts = ops.arg(args, kwargs, 1, "chunks", None)
        dim = ops.arg(args, kwargs, 2, "dim", 0)
        rank = self.rank_of(x.parts[0][0]) if x.kind == "conv" else 1
        channel_dim = dim in ((1, 1 - rank) if x.kind == "conv" else (-1,))
        if self.dirty(x) or x.kind == "flat" or not channel_dim or not isinstance(parts, int) \
                or parts < 1 or self.total(x) % parts:
            self.bad(x, f"{where} is not handled (only equal chunks of the channel dim)")
            return OPAQUE
        rows = self.rows(x, parts)
        why = self.tie_rows(rows, where)
        if why:
            self.bad(x, f"{where}: {why}, so no removal keeps its chunks equal")
            return OPAQUE
        out = []
        for row in rows:
            if len(row) == 1 and row[0][1] == 0 and row[0][0].step == 1:
                out.append(row[0][0])
            else:
                out.append(Cat(tuple(row), x.kind))
        return tuple(out)

    def grouped_view(self, node: torch.fx.Node, x: Any, shape: list[Any], where: str) -> Any:
        """A view of a map with one more dim: ``[N, g, C / g, ...]`` (a shuffle's first
        step) becomes :class:`Grouped`; anything else that splits the channels is refused."""
        g = shape[1]
        per = shape[2]
        follows = per == -1 or (isinstance(per, Sizes) and per.of is x and per.dim == 1
                                and per.div == g)
        if x.kind == "conv" and isinstance(g, int) and g >= 1 and follows \
                and not any(isinstance(s, Sizes) and s.dim == 1 for s in shape[3:] + shape[:1]):
            return Grouped(x, g)
        self.bad(x, f"{where} splits the channels into {shape[1:3]} (only [groups, C // groups]"
                    " with C read from the tensor is followed, as a channel shuffle)")
        return OPAQUE

    def grouped_op(self, node: torch.fx.Node, x: Grouped, args: Any, kwargs: Any,
                   where: str) -> Any:
        """The next steps of a shuffle: swap the two group dims, make contiguous, merge."""
        target = node.target
        method = target if node.op == "call_method" else None
        if method == "contiguous":
            return x
        if target in (torch.transpose, torch.swapaxes, torch.swapdims) \
                or method in ("transpose", "swapaxes", "swapdims"):
            dims = {d % (self.rank_of(self.parts(x.value)[0][0]) + 1) for d in args[1:3]
                    if isinstance(d, int)}
            if dims == {1, 2}:
                return attrs.evolve(x, transposed=not x.transposed)
        merge = None
        if method in ops.VIEW_METHODS:
            packed = len(args) == 2 and isinstance(args[1], (tuple, list))
            shape = list(args[1] if packed else args[1:])
            c = shape[1] if len(shape) > 1 else None
            if len(shape) == self.rank_of(self.parts(x.value)[0][0]) and (c == -1 or (
                    isinstance(c, Sizes) and c.of is x.value and c.dim == 1 and c.div == 1)):
                merge = True
        elif target in ops.FLATTEN_FUNCTIONS or method == "flatten":
            start = ops.arg(args, kwargs, 1, "start_dim", 0)
            end = ops.arg(args, kwargs, 2, "end_dim", -1)
            merge = (start, end) == (1, 2)
        if merge:
            return self.shuffle(node, x.value, x.groups, where) if x.transposed else x.value
        self.bad(x, f"{where} is not handled after a view that splits the channels into "
                    f"{x.groups} groups (only a channel shuffle: transpose(1, 2), then merge)")
        return OPAQUE
