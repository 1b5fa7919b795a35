"""The torch.fx walk that finds a model's channel groups (see :mod:`curvprune.structure.graph`).

:class:`Tracer` interprets a symbolic trace node by node: every producer starts a group, ops
that keep channels apart pass them on, residual adds and products union groups, a channel
``torch.cat`` places groups at offsets, depthwise convolutions pass channel c to channel c,
grouped convolutions ask their groups to keep conv groups equal, and anything else marks the
groups it touches not removable with the node named. The op tables and abstract values are in
:mod:`curvprune.structure.trace_ops`; the rules for shape ops (:mod:`.reshapes`, :mod:`.shuffle`),
norms and layer scales (:mod:`.norms`) and token streams (:mod:`.tokens`: literal channel views,
embeddings, self-attention) are mixins of :class:`Tracer`.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import attrs
import torch
from torch import nn

from curvprune.errors import UnsupportedModelError
from curvprune.structure import trace_ops as ops
from curvprune.structure.groups import ChannelGroup
from curvprune.structure.norms import NormRules
from curvprune.structure.reshapes import NOT_MINE, ShapeRules
from curvprune.structure.shuffle import ShuffleRules
from curvprune.structure.tokens import TokenRules
from curvprune.structure.trace_ops import OPAQUE, Cat, Chan, Opaque, Param, chans, unique

__all__ = ["Tracer"]


class Tracer(NormRules, ShapeRules, ShuffleRules, TokenRules):
    """One pass over the fx graph, recording groups as union-find over producer calls.

    Besides the union-find, it records per element its norms, depthwise convs and consumers
    (each at a channel offset), the grouped convolutions that constrain it, and **gate slots**:
    points (module, offset) where multiplying the element's channels by 0 zeroes everything
    its consumers read. A slot moves down a private chain (BN, depthwise conv); a norm or
    depthwise conv off any private chain opens a new slot, since a zero input does not give a
    zero output there (β - γ·mean/std).
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producer: list[str] = []
        self.kind: list[str] = []
        self.reasons: list[list[str]] = []
        # (module, offset, lo, hi, step): the element's channels [lo, hi) at ``offset``,
        # ``offset + step``, ... in the module
        self.norms: list[list[tuple[str, int, int, int | None, int]]] = []
        self.depthwise: list[list[tuple[str, int, int, int | None, int]]] = []
        self.consumers: list[list[tuple[str, int, int, int, int | None, int]]] = []  # + per
        self.grouping: list[list[tuple[int, str]]] = []  # (equal parts, by what) constraints
        self.slots: list[list[Any]] = []  # [module, offset, elem, lo, hi, step]
        self.spans: dict[tuple[str, str], list[tuple[int, int, int, int]]] = {}
        self.widths: dict[str, int] = {}
        self.produced: dict[str, int] = {}
        self.rank: list[int] = []  # tensor rank of each conv element's maps (0 for Linear)
        self.env: dict[torch.fx.Node, Any] = {}
        self.init_norm_rules()
        self.init_token_rules()

    # -- union-find ---------------------------------------------------------------------------
    def find(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo
        return min(ra, rb)

    def width(self, chan: Chan) -> int:
        """Channels ``chan`` holds (its window of its element's channels)."""
        full = self.size[self.find(chan.elem)]
        return (full if chan.hi is None else chan.hi) - chan.lo

    def same_channels(self, a: Chan, b: Chan) -> bool:
        """Whether channel i of ``a`` and of ``b`` can be one structure (same full width and
        window), so that the two elements may be unioned."""
        return (self.size[self.find(a.elem)] == self.size[self.find(b.elem)]
                and (a.lo, a.hi) == (b.lo, b.hi) and a.kind == b.kind)

    def new(self, size: int, module: str, kind: str, rank: int) -> tuple[int, int]:
        e = len(self.parent)
        self.rank.append(rank)
        self.parent.append(e)
        self.size.append(size)
        self.producer.append(module)
        self.kind.append(kind)
        self.reasons.append([])
        self.norms.append([])
        self.depthwise.append([])
        self.consumers.append([])
        self.grouping.append([])
        slot = self.slot(module, 0, e)
        self.gate_dim[slot] = 1 if kind == "conv" else -1
        return e, slot

    def slot(self, module: str, offset: int, elem: int, lo: int = 0,
             hi: int | None = None, step: int = 1) -> int:
        self.slots.append([module, offset, elem, lo, hi, step])
        return len(self.slots) - 1

    def bad(self, value: Any, reason: str) -> None:
        for chan in chans(value):
            self.reasons[chan.elem].append(reason)

    def dirty(self, value: Any) -> bool:
        """Refuse the nonzero-at-zero channels in ``value`` (their reason); True if any."""
        hit = [c for c in chans(value) if c.nonzero]
        for c in hit:
            self.reasons[c.elem].append(f"{c.nonzero}, and it is not only a channel scale")
        return bool(hit)

    def span(self, name: str, role: str, offset: int, chan: Chan) -> None:
        self.spans.setdefault((name, role), []).append(
            (offset, self.width(chan), chan.elem, chan.step))

    # -- the pass -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op == "get_attr":
            return self.visit_param(node)
        if node.op == "placeholder":
            return OPAQUE
        env = self.env
        args = torch.fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "output":
            self.dirty(args)
            self.bad(args, "its channels reach the model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)], args, kwargs)
        return self.visit_op(node, args, kwargs)

    def passed(self, node: torch.fx.Node, value: Any) -> Any:
        """``value`` after a pass-through op at ``node``: same elements, private chains kept
        only while the input had a single user."""
        source = node.args[0] if node.args else None
        single = isinstance(source, torch.fx.Node) and len(source.users) == 1
        if isinstance(value, Chan):
            return attrs.evolve(value, chain=value.chain if single else None)
        if isinstance(value, Cat):
            return Cat(tuple((attrs.evolve(c, chain=c.chain if single else None), o)
                             for c, o in value.parts), value.kind)
        return value

    def parts(self, value: Chan | Cat) -> list[tuple[Chan, int]]:
        return [(value, 0)] if isinstance(value, Chan) else list(value.parts)

    def total(self, value: Chan | Cat) -> int:
        return sum(self.width(c) for c, _ in self.parts(value))

    def visit_module(self, node: torch.fx.Node, module: nn.Module, args: Any, kwargs: Any) -> Any:
        name = str(node.target)
        x = args[0] if args else OPAQUE
        others = (args[1:], kwargs)
        if isinstance(module, nn.MultiheadAttention):
            return self.visit_attention(node, name, module, args, kwargs)
        if chans(others):
            self.bad(others, f"module {name!r} takes several channel inputs")
            self.bad(x, f"module {name!r} takes several channel inputs")
            return OPAQUE
        if isinstance(module, ops.CONV) and _depthwise(module):
            return self.visit_depthwise(node, name, module, x)
        if isinstance(module, ops.CONV) or isinstance(module, nn.Linear):
            return self.visit_producer(name, module, x)
        if isinstance(module, ops.NORM):
            return self.visit_norm(node, name, module, x)
        if isinstance(module, ops.PASS_MODULES) or ops.is_leaf_pass(module):
            return self.passed(node, x)
        if isinstance(module, ops.GATE_MODULES):
            return self.scale_op(x, f"{type(module).__name__} {name!r}")
        if isinstance(module, nn.Flatten):
            if module.start_dim == 1 and module.end_dim == -1:
                return self.flatten(x, name)
            self.bad(x, f"nn.Flatten {name!r} with start_dim={module.start_dim}")
            return OPAQUE
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            return self.visit_channel_norm(node, name, module, x)
        if isinstance(module, nn.ChannelShuffle):
            return self.shuffle(node, x, module.groups, f"ChannelShuffle {name!r}")
        if isinstance(x, (Chan, Cat)) and isinstance(module, ops.MIXING_NORMS):
            self.bad(x, f"{type(module).__name__} {name!r} normalises across the channels "
                        "(removing one changes the others' statistics)")
        elif isinstance(x, (Chan, Cat)):
            self.bad(x, f"module {name!r} ({type(module).__name__}) is not handled")
        return OPAQUE

    def visit_norm(self, node: torch.fx.Node, name: str, module: nn.Module, x: Any) -> Any:
        if not isinstance(x, (Chan, Cat)):
            return x
        if self.dirty(x) or x.kind == "flat" or self.total(x) != module.num_features:
            self.bad(x, f"BatchNorm {name!r} does not act on the channels")
            return OPAQUE
        return self.per_channel(node, name, "norm", x, module.num_features)

    def visit_depthwise(self, node: torch.fx.Node, name: str, module: nn.Module, x: Any) -> Any:
        if not isinstance(x, (Chan, Cat)):
            return self.visit_producer(name, module, x)
        if self.dirty(x) or x.kind != "conv" or self.total(x) != module.in_channels:
            self.bad(x, f"depthwise convolution {name!r} does not read them as a channel map")
            return OPAQUE
        return self.per_channel(node, name, "dw", x, module.in_channels)

    def per_channel(self, node: torch.fx.Node, name: str, role: str, x: Chan | Cat,
                    width: int) -> Any:
        """A module acting on each channel alone (BN, depthwise conv): it joins the groups at
        their offsets, and becomes their gate point (moved down a private chain, or new)."""
        self.widths[name] = width
        out = self.passed(node, x)
        new_parts = []
        for (chan, offset), (after, _) in zip(self.parts(x), self.parts(out), strict=True):
            self.span(name, role, offset, chan)
            (self.norms if role == "norm" else self.depthwise)[chan.elem].append(
                (name, offset, chan.lo, chan.hi, chan.step))
            if chan.chain is not None and after.chain is not None:
                self.slots[chan.chain][:2] = [name, offset]
                self.slots[chan.chain][5] = chan.step
                slot = chan.chain
            else:
                slot = self.slot(name, offset, chan.elem, chan.lo, chan.hi, chan.step)
            self.gate_dim[slot] = self.channel_pos(chan)
            new_parts.append((attrs.evolve(chan, chain=slot), offset))
        if isinstance(x, Chan):
            return new_parts[0][0]
        return Cat(tuple(new_parts), x.kind)

    def visit_producer(self, name: str, module: nn.Module, x: Any) -> Any:
        is_conv = isinstance(module, ops.CONV)
        if isinstance(x, (Chan, Cat)) and not self.dirty(x):
            self.consume(name, module, x)
        elif isinstance(x, (Chan, Cat)):
            self.bad(x, f"{name!r} reads channels that are not zero when removed")
        if name in self.produced:
            reason = f"module {name!r} is called more than once"
            self.reasons[self.produced[name]].append(reason)
            return OPAQUE
        out = module.out_channels if is_conv else module.out_features
        rank = module.weight.dim() if is_conv else 0
        elem, slot = self.new(out, name, "conv" if is_conv else "linear", rank)
        if is_conv and module.groups != 1:
            self.grouping[elem].append(
                (module.groups, f"grouped convolution {name!r} (groups={module.groups})"))
        self.produced[name] = elem
        return Chan(elem, "conv" if is_conv else "linear", slot)

    def consume(self, name: str, module: nn.Module, x: Chan | Cat) -> None:
        """Record Conv/Linear ``name`` reading ``x`` (each part at its offset), or refuse."""
        total = self.total(x)
        if isinstance(module, ops.CONV):
            per = 1
            if x.kind != "conv":
                self.bad(x, f"convolution {name!r} reads them flattened")
                return
            if module.groups != 1 and (isinstance(x, Cat) or x.lo or x.hi is not None):
                what = "a concatenation or shuffled channels" if isinstance(x, Cat) \
                    else "a chunk"
                self.bad(x, f"grouped convolution {name!r} reads {what}")
                return
        else:
            per, rest = divmod(module.in_features, total)
            if x.kind == "conv" or (x.kind == "linear" and per != 1):
                self.bad(x, f"Linear {name!r} reads a convolution map (not flattened)")
                return
            if rest:
                raise UnsupportedModelError(
                    f"Linear {name!r} has in_features={module.in_features}, not a multiple "
                    f"of the {total} channels flattened before it @ model"
                )
        for chan, offset in self.parts(x):
            self.span(name, "in", offset, chan)
            self.consumers[chan.elem].append((name, per, offset, chan.lo, chan.hi, chan.step))
            if isinstance(module, ops.CONV) and module.groups != 1:
                self.grouping[chan.elem].append(
                    (module.groups, f"grouped convolution {name!r} (groups={module.groups})"))

    def scale_op(self, x: Any, label: str) -> Any:
        """A sigmoid-like op: its result is a channel scale (nonzero at zero)."""
        if isinstance(x, Chan):
            return attrs.evolve(x, chain=None, nonzero=x.nonzero or (
                f"{label} maps a zero channel to a nonzero value"))
        if isinstance(x, Cat):
            self.bad(x, f"{label} of a concatenation is not handled")
        return OPAQUE if isinstance(x, (Cat, Opaque)) else x

    def visit_op(self, node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
        target = node.target
        method = target if node.op == "call_method" else None
        label = method if method else getattr(target, "__name__", str(target))
        where = f"{label} at node {node.name!r}"
        x = args[0] if args else OPAQUE
        is_meta_attr = target is getattr and len(args) > 1 and args[1] in ops.META_ATTRS
        value = self.visit_token_op(node, args, kwargs, where, NOT_MINE)
        if value is NOT_MINE:
            value = self.visit_shape_op(node, args, kwargs, where)
        if value is not NOT_MINE:
            return value
        if method in ops.META_METHODS or is_meta_attr:
            return None
        if isinstance(x, (tuple, list)) and chans(x):  # the chunks of a map, a tuple of outputs
            if target is operator.getitem and isinstance(args[1], int):
                return x[args[1]]
        elif target in (getattr, operator.getitem) and not isinstance(x, (Chan, Cat, Opaque)):
            return None
        if isinstance(target, type) and issubclass(target, tuple):  # a namedtuple of outputs
            return (*args, *kwargs.values())
        if target in ops.ADD or method in ops.ADD_METHODS:
            return self.add(node, args, kwargs, where)
        if target in ops.SCALE or method in ops.SCALE_METHODS:
            operands = list(args) + list(kwargs.values())
            tensors = [a for a in operands if isinstance(a, (Chan, Cat, Opaque))]
            divide = label in ("truediv", "itruediv", "div", "div_")
            if len(tensors) == 1 and isinstance(tensors[0], (Chan, Cat)) and (
                    not divide or operands[0] is tensors[0]):
                return self.passed(node, tensors[0])
            is_mul = target in ops.MUL or method in ops.MUL_METHODS
            if is_mul and len(tensors) == 2 and all(isinstance(t, Chan) for t in tensors):
                return self.multiply(tensors[0], tensors[1], where)
        elif target in ops.GATE_FUNCTIONS or method in ops.GATE_METHODS:
            if not chans((args[1:], kwargs)):
                return self.scale_op(x, where)
        elif target in ops.PASS_FUNCTIONS or method in ops.PASS_METHODS:
            if not chans((args[1:], kwargs)):
                return self.passed(node, x)
        elif target in ops.CAT:
            return self.cat(args, kwargs, where)
        elif (target in ops.CHUNK or method == "chunk") and isinstance(x, Chan):
            return self.chunk(x, args, kwargs, where)
        elif target in ops.FLATTEN_FUNCTIONS or method == "flatten":
            start = ops.arg(args, kwargs, 1, "start_dim", 0)
            end = ops.arg(args, kwargs, 2, "end_dim", -1)
            if start == 1 and end == -1:
                return self.flatten(x, node.name)
        elif method in ops.VIEW_METHODS:
            packed = len(args) == 2 and isinstance(args[1], (tuple, list))
            shape = args[1] if packed else args[1:]
            if len(shape) == 2 and isinstance(x, (Chan, Cat)) and x.kind == "conv":
                return self.flatten(x, node.name)
        elif method == "mean" or target is torch.mean:
            dims = ops.arg(args, kwargs, 1, "dim", None)
            keep = ops.arg(args, kwargs, 2, "keepdim", False)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(x, (Chan, Cat)) and x.kind == "conv" and dims:
                rank = self.rank_of(self.parts(x)[0][0])
                if all(isinstance(d, int) and -rank <= d < rank and d % rank >= 2 for d in dims):
                    return self.passed(node, x) if keep else self.flatten(x, node.name)
        touched = chans((args, kwargs))
        if touched:
            self.dirty(touched)
            mixing = target in ops.MIXING_FUNCTIONS
            self.bad(touched, f"{where} normalises across the channels (removing one changes the "
                              "others' statistics)" if mixing else f"{where} is not handled")
        return OPAQUE

    def multiply(self, a: Chan, b: Chan, where: str) -> Any:
        """A channel-wise product (squeeze-and-excitation, gating): channel c of both factors
        goes together, and it is zero when either factor's channel is (so one factor may be a
        sigmoid scale)."""
        if not self.same_channels(a, b) or (a.nonzero and b.nonzero):
            self.bad((a, b), f"{where} multiplies tensors of different channel layouts"
                     if not (a.nonzero and b.nonzero) else f"{where} multiplies two scales")
            return OPAQUE
        return self.joined(a, b)

    def add(self, node: torch.fx.Node, args: Any, kwargs: Any, where: str) -> Any:
        operands = list(args[:2])
        if "alpha" in kwargs or len(args) > 2:
            self.bad((args, kwargs), f"{where} with alpha is not handled")
            return OPAQUE
        values = [a for a in operands if isinstance(a, (Chan, Cat))]
        if not values:
            return OPAQUE if any(isinstance(a, Opaque) for a in operands) else None
        if self.dirty(values):
            return OPAQUE
        if len(values) == 1:
            other = operands[1] if operands[0] is values[0] else operands[0]
            if isinstance(other, (int, float)) and other == 0:
                return self.passed(node, values[0])
            if isinstance(other, Param):
                return self.embedding(node, values[0], other, where)
            what = "an untracked tensor" if isinstance(other, Opaque) else f"the constant {other!r}"
            self.bad(values, f"{where} adds {what} to the channels")
            return OPAQUE
        a, b = values
        pa, pb = self.parts(a), self.parts(b)
        layout = len(pa) == len(pb) and all(
            oa == ob and ca.step == cb.step and self.same_channels(ca, cb)
            for (ca, oa), (cb, ob) in zip(pa, pb))
        if a.kind != b.kind or not layout:
            self.bad(values, f"{where} adds tensors of different channel layouts")
            return OPAQUE
        joined = [(self.joined(ca, cb), o) for (ca, o), (cb, _) in zip(pa, pb, strict=True)]
        return joined[0][0] if isinstance(a, Chan) else Cat(tuple(joined), a.kind)

    def joined(self, a: Chan, b: Chan) -> Chan:
        """The channels of ``a`` and ``b`` (same layout) as one element, their rank kept."""
        rank = self.rank_of(a) if a.kind == "conv" else (a.rank or b.rank)
        return attrs.evolve(a, elem=self.union(a.elem, b.elem), chain=None, nonzero=None,
                            rank=rank)

    # -- result -------------------------------------------------------------------------------
    def groups(self) -> tuple[ChannelGroup, ...]:
        n = len(self.parent)
        roots = [self.find(e) for e in range(n)]
        members: dict[int, list[int]] = {}
        for e, r in enumerate(roots):
            members.setdefault(r, []).append(e)
        # A module reading or normalising channels of two groups at overlapping places (a
        # module called on two streams) cannot be sliced.
        for (name, _), spans in self.spans.items():
            places = [set(range(o, o + s * w, s)) for o, w, _, s in spans]
            for i, (_, _, ea, _) in enumerate(spans):
                for j, (_, _, eb, _) in enumerate(spans[i + 1:], i + 1):
                    if roots[ea] != roots[eb] and places[i] & places[j]:
                        for e in (ea, eb):
                            self.reasons[roots[e]].append(
                                f"module {name!r} touches channels of several groups")
        slots: dict[int, list[tuple[str, int, int, int | None, int]]] = {}
        for i, (module, offset, elem, lo, hi, step) in enumerate(self.slots):
            dim = self.gate_dim.get(i, 1)
            slots.setdefault(roots[elem], []).append((module, offset, lo, hi, step, dim))
        return tuple(self.group(r, members[r], unique(slots.get(r, ()))) for r in sorted(members))

    def group(self, r: int, elems: list[int], gates: list[Any]) -> ChannelGroup:
        reasons = unique(x for e in elems for x in self.reasons[e])
        kinds = {self.kind[e] for e in elems}
        copies, width, block = 1, self.size[r], 1
        for g, what in unique(x for e in elems for x in self.grouping[e]):
            copies = math.lcm(copies, g)
            if width % copies:
                reasons.append(f"{what} needs the {width} channels in equal slots of "
                               f"{copies} parts")
                copies = 1
                break
        for w, what in unique(x for e in elems for x in self.blocks.get(e, ())):
            block = math.lcm(block, w)
            if width % (copies * block):
                reasons.append(f"{what} needs the {width} channels in whole blocks of "
                               f"{block} in each of {copies} equal parts")
                block = 1
                break

        def window(lo: int, hi: int | None) -> tuple[int, int]:
            return (lo, width if hi is None else hi)

        def steps(records: list[Any]) -> tuple[int, ...]:
            """Each record's step (its last entry); empty when all are 1."""
            out = tuple(r[-1] for r in records)
            return out if any(s != 1 for s in out) else ()
        norms = unique(x for e in elems for x in self.norms[e])
        consumers = unique(x for e in elems for x in self.consumers[e])
        depthwise = unique(x for e in elems for x in self.depthwise[e])
        scales = unique(x for e in elems for x in self.scales.get(e, ()))
        return ChannelGroup(
            name=self.producer[elems[0]],
            size=width // (copies * block),
            producers=tuple(self.producer[e] for e in elems),
            norms=tuple(m for m, *_ in norms),
            consumers=tuple((m, per) for m, per, *_ in consumers),
            coupled=len(elems) > 1,
            removable=not reasons,
            reason="; ".join(reasons) if reasons else None,
            gates=tuple(m for m, *_ in gates),
            channel_dim=1 if kinds == {"conv"} else -1,
            copies=copies,
            norm_offsets=tuple(o for _, o, *_ in norms),
            consumer_offsets=tuple(o for _, _, o, *_ in consumers),
            depthwise=tuple(m for m, *_ in depthwise),
            depthwise_offsets=tuple(o for _, o, *_ in depthwise),
            gate_offsets=tuple(o for _, o, *_ in gates),
            norm_windows=tuple(window(lo, hi) for *_, lo, hi, _ in norms),
            consumer_windows=tuple(window(lo, hi) for *_, lo, hi, _ in consumers),
            depthwise_windows=tuple(window(lo, hi) for *_, lo, hi, _ in depthwise),
            gate_windows=tuple(window(lo, hi) for *_, lo, hi, _, _ in gates),
            norm_steps=steps(norms),
            consumer_steps=steps(consumers),
            depthwise_steps=steps(depthwise),
            gate_steps=steps([g[:-1] for g in gates]),
            scale_steps=steps(scales),
            gate_dims=tuple(dim for *_, dim in gates),
            block=block,
            renorms=tuple(unique(x for e in elems for x in self.renorms.get(e, ()))),
            scales=tuple((p, dim) for p, dim, *_ in scales),
            scale_offsets=tuple(o for _, _, o, *_ in scales),
            scale_windows=tuple(window(lo, hi) for *_, lo, hi, _ in scales),
            splits=tuple(unique(x for e in elems for x in self.splits.get(e, ()))),
            embeddings=tuple(unique(x for e in elems for x in self.embeds.get(e, ()))),
            literals=tuple(unique(x for e in elems for x in self.literals.get(e, ()))),
        )


def _depthwise(module: nn.Module) -> bool:
    """A depthwise convolution: one input channel per output channel (``groups = in = out``)."""
    return bool(module.groups > 1 and module.groups == module.in_channels == module.out_channels)
