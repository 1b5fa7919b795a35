"""The torch.fx walk that finds a model's channel groups (see :mod:`curvprune.structure.graph`).

:class:`Tracer` interprets a symbolic trace node by node: every producer starts a group, ops
that keep channels apart pass them on, residual adds union groups, and anything else marks the
groups it touches not removable with the node named.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from curvprune.errors import UnsupportedModelError
from curvprune.structure.groups import ChannelGroup

__all__ = ["Tracer"]



# --------------------------------------------------------------------------------------------
# What the tracer understands
# --------------------------------------------------------------------------------------------
#: Modules that map a zero channel to a zero channel and keep channels apart.
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink,
    nn.Softshrink, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

#: Functions and tensor methods with the same property.
_PASS_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.tanh, torch.tanh, F.softsign,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
})
_PASS_METHODS = frozenset({"relu", "relu_", "tanh", "tanh_", "clone", "contiguous", "detach"})
_ADD = frozenset({operator.add, operator.iadd, torch.add})
_ADD_METHODS = frozenset({"add", "add_"})
_SCALE = frozenset({operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv})
_SCALE_METHODS = frozenset({"mul", "mul_", "div", "div_"})
_FLATTEN_FUNCTIONS = frozenset({torch.flatten})
_VIEW_METHODS = frozenset({"view", "reshape"})
_META_METHODS = frozenset({"size", "dim", "numel", "ndimension"})
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------
@attrs.define
class _Chan:
    """Abstract value of a traced tensor whose channels belong to one element (producer call).

    ``kind``: ``conv`` (channels on dim 1 of a map), ``linear`` (features on the last dim) or
    ``flat`` (a flattened map: each channel a block of consecutive features). ``chain``: the
    element whose private chain (single users, no merge) this value still is on, else None.
    """

    elem: int
    kind: str
    chain: int | None


class _Opaque:
    """A tensor the tracer knows nothing about (the input, an unknown op's output)."""


_OPAQUE = _Opaque()


class Tracer:
    """One pass over the fx graph, recording groups as union-find over producer calls."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.parent: list[int] = []
        self.size: list[int] = []
        self.producer: list[str] = []
        self.kind: list[str] = []
        self.gate: list[str] = []
        self.reasons: list[list[str]] = []
        self.norms: list[list[str]] = []
        self.consumers: list[list[tuple[str, int]]] = []
        self.module_elems: dict[str, set[int]] = {}  # module -> elements it reads or makes
        self.produced: dict[str, int] = {}
        self.rank: list[int] = []  # tensor rank of each conv element's maps (0 for Linear)
        self.env: dict[torch.fx.Node, Any] = {}

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

    def new(self, size: int, module: str, kind: str, reason: str | None, rank: int) -> int:
        e = len(self.parent)
        self.rank.append(rank)
        self.parent.append(e)
        self.size.append(size)
        self.producer.append(module)
        self.kind.append(kind)
        self.gate.append(module)
        self.reasons.append([reason] if reason else [])
        self.norms.append([])
        self.consumers.append([])
        return e

    def bad(self, value: Any, reason: str) -> None:
        for chan in _chans(value):
            self.reasons[chan.elem].append(reason)

    # -- the pass -----------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)

    def arg(self, a: Any) -> Any:
        return torch.fx.node.map_arg(a, lambda n: self.env[n])

    def visit(self, node: torch.fx.Node) -> Any:
        if node.op in ("placeholder", "get_attr"):
            return _OPAQUE
        args, kwargs = self.arg(node.args), self.arg(node.kwargs)
        if node.op == "output":
            self.bad(args, "its channels reach the model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)], args, kwargs)
        return self.visit_op(node, args, kwargs)

    def passed(self, node: torch.fx.Node, value: Any) -> Any:
        """``value`` after a pass-through op at ``node``: same element, private chain kept
        only while the input had a single user."""
        if not isinstance(value, _Chan):
            return value
        source = node.args[0] if node.args else None
        single = isinstance(source, torch.fx.Node) and len(source.users) == 1
        return _Chan(value.elem, value.kind, value.chain if single else None)

    def uses(self, name: str, value: Any) -> None:
        """Record that module ``name`` reads (or writes) ``value``'s element."""
        if isinstance(value, _Chan):
            self.module_elems.setdefault(name, set()).add(value.elem)

    def visit_module(self, node: torch.fx.Node, module: nn.Module, args: Any, kwargs: Any) -> Any:
        name = str(node.target)
        x = args[0] if args else _OPAQUE
        others = (args[1:], kwargs)
        if _chans(others):
            self.bad(others, f"module {name!r} takes several channel inputs")
            self.bad(x, f"module {name!r} takes several channel inputs")
            return _OPAQUE
        if isinstance(module, _CONV) or isinstance(module, nn.Linear):
            return self.visit_producer(node, name, module, x)
        if isinstance(module, _NORM):
            if not isinstance(x, _Chan):
                return x
            if x.kind == "flat" or self.size[x.elem] != module.num_features:
                self.bad(x, f"BatchNorm {name!r} does not act on the channels")
                return _OPAQUE
            self.uses(name, x)
            self.norms[x.elem].append(name)
            out = self.passed(node, x)
            if x.chain is not None and x.chain == x.elem and out.chain is not None:
                self.gate[x.elem] = name
            return out
        if isinstance(module, _PASS_MODULES):
            return self.passed(node, x)
        if isinstance(module, nn.Flatten):
            if module.start_dim == 1 and module.end_dim == -1:
                return self.flatten(node, x, name)
            self.bad(x, f"nn.Flatten {name!r} with start_dim={module.start_dim}")
            return _OPAQUE
        if isinstance(x, _Chan):
            self.bad(x, f"module {name!r} ({type(module).__name__}) is not handled")
        return _OPAQUE

    def visit_producer(
        self, node: torch.fx.Node, name: str, module: nn.Module, x: Any
    ) -> Any:
        is_conv = isinstance(module, _CONV)
        if isinstance(x, _Chan):
            if is_conv:
                ok = x.kind == "conv" and module.groups == 1
                per = 1
                why = f"grouped convolution {name!r} reads them" if module.groups != 1 else (
                    f"convolution {name!r} reads them flattened")
            else:
                per, rest = divmod(module.in_features, self.size[x.elem])
                ok = x.kind in ("flat", "linear") and (x.kind == "flat" or per == 1)
                why = f"Linear {name!r} reads a convolution map (not flattened)"
                if ok and rest:
                    raise UnsupportedModelError(
                        f"Linear {name!r} has in_features={module.in_features}, not a multiple "
                        f"of the {self.size[x.elem]} channels flattened before it @ model"
                    )
            if ok:
                self.uses(name, x)
                self.consumers[x.elem].append((name, per))
            else:
                self.bad(x, why)
        if name in self.produced:
            reason = f"module {name!r} is called more than once"
            self.reasons[self.produced[name]].append(reason)
            return _OPAQUE
        out = module.out_channels if is_conv else module.out_features
        reason = None
        if is_conv and module.groups != 1:
            reason = f"{name!r} is a grouped convolution (groups={module.groups})"
        rank = module.weight.dim() if is_conv else 0
        elem = self.new(out, name, "conv" if is_conv else "linear", reason, rank)
        self.produced[name] = elem
        return _Chan(elem, "conv" if is_conv else "linear", elem)

    def flatten(self, node: torch.fx.Node, x: Any, where: str) -> Any:
        if not isinstance(x, _Chan):
            return x
        if x.kind != "conv":
            self.bad(x, f"flatten at {where!r} of features that are not a channel map")
            return _OPAQUE
        return _Chan(x.elem, "flat", None)

    def visit_op(self, node: torch.fx.Node, args: Any, kwargs: Any) -> Any:
        target = node.target
        method = target if node.op == "call_method" else None
        label = method if method else getattr(target, "__name__", str(target))
        where = f"{label} at node {node.name!r}"
        x = args[0] if args else _OPAQUE
        is_meta_attr = target is getattr and len(args) > 1 and args[1] in _META_ATTRS
        if method in _META_METHODS or is_meta_attr:
            return None
        if target is operator.getitem and not isinstance(x, (_Chan, _Opaque)):
            return None
        if target in _ADD or method in _ADD_METHODS:
            return self.add(node, args, kwargs, where)
        if target in _SCALE or method in _SCALE_METHODS:
            operands = list(args) + list(kwargs.values())
            tensors = [a for a in operands if isinstance(a, (_Chan, _Opaque))]
            if len(tensors) == 1 and isinstance(tensors[0], _Chan):
                return self.passed(node, tensors[0])
        elif target in _PASS_FUNCTIONS or method in _PASS_METHODS:
            if not _chans((args[1:], kwargs)):
                return self.passed(node, x)
        elif target in _FLATTEN_FUNCTIONS or method == "flatten":
            start = _arg(args, kwargs, 1, "start_dim", 0)
            end = _arg(args, kwargs, 2, "end_dim", -1)
            if start == 1 and end == -1:
                return self.flatten(node, x, node.name)
        elif method in _VIEW_METHODS:
            packed = len(args) == 2 and isinstance(args[1], (tuple, list))
            shape = args[1] if packed else args[1:]
            if len(shape) == 2 and isinstance(x, _Chan) and x.kind == "conv":
                return self.flatten(node, x, node.name)
        elif method == "mean" or target is torch.mean:
            dims = _arg(args, kwargs, 1, "dim", None)
            keep = _arg(args, kwargs, 2, "keepdim", False)
            dims = (dims,) if isinstance(dims, int) else dims
            if isinstance(x, _Chan) and x.kind == "conv" and dims:
                rank = self.rank[x.elem]
                if all(isinstance(d, int) and -rank <= d < rank and d % rank >= 2 for d in dims):
                    return self.passed(node, x) if keep else _Chan(x.elem, "flat", None)
        touched = _chans((args, kwargs))
        if touched:
            self.bad(touched, f"{where} is not handled")
        return _OPAQUE

    def add(self, node: torch.fx.Node, args: Any, kwargs: Any, where: str) -> Any:
        operands = list(args[:2])
        if "alpha" in kwargs or len(args) > 2:
            self.bad((args, kwargs), f"{where} with alpha is not handled")
            return _OPAQUE
        chans = [a for a in operands if isinstance(a, _Chan)]
        if not chans:
            return _OPAQUE if any(isinstance(a, _Opaque) for a in operands) else None
        if len(chans) == 1:
            other = operands[1] if operands[0] is chans[0] else operands[0]
            if isinstance(other, (int, float)) and other == 0:
                return self.passed(node, chans[0])
            what = (
                "an untracked tensor" if isinstance(other, _Opaque) else f"the constant {other!r}"
            )
            self.bad(chans, f"{where} adds {what} to the channels")
            return _OPAQUE
        a, b = chans
        if a.kind != b.kind or self.size[self.find(a.elem)] != self.size[self.find(b.elem)]:
            self.bad(chans, f"{where} adds tensors of different channel layouts")
            return _OPAQUE
        root = self.union(a.elem, b.elem)
        return _Chan(root, a.kind, None)

    # -- result -------------------------------------------------------------------------------
    def groups(self) -> tuple[ChannelGroup, ...]:
        n = len(self.parent)
        roots = [self.find(e) for e in range(n)]
        members: dict[int, list[int]] = {}
        for e, r in enumerate(roots):
            members.setdefault(r, []).append(e)
        # A module reading or normalising channels of two different groups cannot be sliced.
        for name, elems in self.module_elems.items():
            hit = {roots[e] for e in elems}
            if len(hit) > 1:
                for r in hit:
                    self.reasons[r].append(f"module {name!r} touches channels of several groups")
        out = []
        for r in sorted(members):
            elems = members[r]
            reasons = _unique(x for e in elems for x in self.reasons[e])
            kinds = {self.kind[e] for e in elems}
            out.append(ChannelGroup(
                name=self.producer[elems[0]],
                size=self.size[r],
                producers=tuple(self.producer[e] for e in elems),
                norms=tuple(_unique(x for e in elems for x in self.norms[e])),
                consumers=tuple(_unique(x for e in elems for x in self.consumers[e])),
                coupled=len(elems) > 1,
                removable=not reasons,
                reason="; ".join(reasons) if reasons else None,
                gates=tuple(self.gate[e] for e in elems),
                channel_dim=1 if kinds == {"conv"} else -1,
            ))
        return tuple(out)


def _chans(value: Any) -> list[_Chan]:
    """Every :class:`_Chan` inside nested args."""
    out: list[_Chan] = []

    def walk(v: Any) -> None:
        if isinstance(v, _Chan):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)

    walk(value)
    return out


def _arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def _unique(items: Any) -> list[Any]:
    seen: dict[Any, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
