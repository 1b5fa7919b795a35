"""Channel structures: which output channels can be pruned together, gated, and removed.

A **channel group** is a set of output channels (dim 0 of Conv/Linear weights) that must be kept
or removed together. :meth:`StructureGraph.trace` finds them with a ``torch.fx`` symbolic trace
(no input needed) by following every producer's output through the ops that keep its channels
apart:

* a producer (``Conv1d``/``Conv2d``/``Conv3d`` with ``groups = 1``, or ``Linear``) starts a group of
  ``out_channels`` channels;
* BatchNorm layers slice with it (they are the group's ``norms``);
* zero-preserving element-wise ops (ReLU and friends, tanh, pooling, dropout, identity, scaling
  by a number) and flattening pass it on unchanged; flattening a ``[N, C, H, W]`` map turns each
  channel into ``in_features / C`` consecutive features of the following Linear layer;
* a residual ``add`` couples the channels of its inputs: channel c of every producer feeding the
  sum is one **structure** (a torchvision ResNet stage stream is the stem or downsample BN output
  plus the last BN output of each block: Nonnenmacher et al., 2022, treat such a coupled
  channel as one structure; greg_sosp memo §4.5);
* Conv and Linear layers reading the channels are the group's ``consumers`` (their input dims
  are sliced on removal).

Anything else touching a group's channels (``torch.cat``, ``F.pad``, slicing, views other than a
flatten, grouped or depthwise convolutions, ops with f(0) ≠ 0 such as sigmoid, modules the
tracer does not know) marks the groups involved not removable, with a reason naming the node:
removing their channels would silently produce a wrong model (the option-A zero-pad shortcut
pitfall of DepGraph, memo §7.1). A group whose channels reach the model's output (the
classifier) is never prunable.

**Gates.** Removing structure s is the same as multiplying its channel by a gate m_s = 0 at the
post-BN output of each of its producers (memo §4.2): every later op maps the zero channel to
zero, so every consumer reads zeros, exactly as if the channel were gone. Masking a structure
zeroes its producers' weight rows and biases and its BatchNorms' γ and β, which makes the gated
output exactly 0 (BN computes γ·x̂ + β). :meth:`Structures.gates` installs the gates as forward
hooks so a scorer can differentiate the loss with respect to them (SOSP).
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvprune.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:
    from curvprune.layout import ParamLayout

__all__ = ["ChannelGroup", "StructureGraph", "Structures", "apply_removal", "attach_structures"]


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


@attrs.frozen
class ChannelGroup:
    """Output channels that are kept or removed together.

    Attributes:
        name: the first producer's module name.
        size: number of channels.
        producers: Conv/Linear modules whose output channels (weight rows) form the group.
        norms: BatchNorm modules sliced with the group.
        consumers: ``(module_name, per_channel)``: Conv/Linear layers reading the channels;
            ``per_channel`` is the number of input features per channel (a Linear layer after
            a flatten of ``[N, C, H, W]`` reads H·W features per channel), else 1.
        coupled: whether several producers feed the same channels (a residual stream).
        removable: whether the channels can be removed physically (and so pruned).
        reason: why not, naming the node or module, when ``removable`` is False.
        gates: the module after which each producer's channels are gated: the BatchNorm
            right after it when there is one, else the producer; one per producer.
        channel_dim: the channel dimension of the gated outputs: 1 (Conv maps) or -1 (Linear
            features).
    """

    name: str
    size: int
    producers: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[tuple[str, int], ...]
    coupled: bool
    removable: bool
    reason: str | None = None
    gates: tuple[str, ...] = ()
    channel_dim: int = 1

    def to_json(self) -> dict[str, Any]:
        """The group as plain JSON values."""
        return {
            "name": self.name, "size": self.size, "producers": list(self.producers),
            "norms": list(self.norms), "consumers": [list(c) for c in self.consumers],
            "coupled": self.coupled, "removable": self.removable, "reason": self.reason,
        }


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


class _Tracer:
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


# --------------------------------------------------------------------------------------------
# The graph and the structures of a layout
# --------------------------------------------------------------------------------------------
@attrs.frozen(eq=False)
class StructureGraph:
    """The channel groups of a model, found by :meth:`trace`.

    Attributes:
        groups: every group, in the order its first producer runs.
        param_names: the model's parameter names at trace time.
        model_type: the traced model's class name.
    """

    groups: tuple[ChannelGroup, ...]
    param_names: frozenset[str]
    model_type: str

    @classmethod
    def trace(cls, model: nn.Module) -> StructureGraph:
        """Trace ``model`` with ``torch.fx`` (no input needed) and find its channel groups.

        Raises:
            UnsupportedModelError: the model cannot be traced symbolically (the cause is named),
                or a Linear layer's input is not a whole number of features per flattened channel.
        """
        try:
            gm = torch.fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - fx raises many types; the cause is reported
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UnsupportedModelError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
                f"{cause}); channel structures need a symbolically traceable model, or set "
                "mask.coupled = false for per-layer channels without tracing @ model"
            ) from None
        tracer = _Tracer(gm)
        tracer.run()
        return cls(
            groups=tracer.groups(),
            param_names=frozenset(n for n, _ in model.named_parameters()),
            model_type=type(model).__name__,
        )

    def group(self, name: str) -> ChannelGroup:
        """The group with this name (its first producer), or the group ``name`` produces."""
        for g in self.groups:
            if g.name == name or name in g.producers:
                return g
        raise KeyError(f"no channel group produced by {name!r}")

    def structures(self, layout: ParamLayout) -> Structures:
        """The prunable structures among the parameters ``layout`` selects.

        A group is prunable when it is removable and the weights of all its producers are
        selected. Its channels become structures ``offsets[g] .. offsets[g] + size - 1``.
        """
        position = {name: i for i, name in enumerate(layout.names)}
        chosen = []
        for g in self.groups:
            where = [position.get(f"{p}.weight") for p in g.producers]
            if g.removable and all(i is not None for i in where):
                chosen.append((min(w for w in where if w is not None), g))
        chosen.sort(key=lambda item: item[0])
        groups = tuple(g for _, g in chosen)
        offsets, acc = [], 0
        for g in groups:
            offsets.append(acc)
            acc += g.size
        channel_offsets = [0]
        for c in layout.channels:
            channel_offsets.append(channel_offsets[-1] + c)
        channel_structure = torch.full((channel_offsets[-1],), -1, dtype=torch.long)
        for g, off in zip(groups, offsets, strict=True):
            for p in g.producers:
                i = position[f"{p}.weight"]
                if layout.channels[i] != g.size:
                    raise ConfigError(
                        f"parameter {p}.weight has {layout.channels[i]} output channels but its "
                        f"group has {g.size} @ layout"
                    )
                start = channel_offsets[i]
                channel_structure[start : start + g.size] = torch.arange(off, off + g.size)
        structure_group = torch.repeat_interleave(
            torch.arange(len(groups)), torch.tensor([g.size for g in groups], dtype=torch.long)
        )
        return Structures(
            graph=self,
            groups=groups,
            offsets=tuple(offsets),
            channel_structure=channel_structure,
            structure_group=structure_group,
            layout_names=layout.names,
        )


@attrs.frozen(eq=False)
class Structures:
    """The prunable structures of a layout: one per channel of each prunable group.

    Attributes:
        graph: the traced graph.
        groups: the prunable groups, ordered by their first producer's place in the layout.
        offsets: first structure id of each group; structures ``[0, S)``.
        channel_structure: long ``[n_channels]``: for each output channel of the layout's
            parameters (numbered as in :meth:`ParamLayout.channel_index`), its structure id, or
            -1 for channels that are never pruned (not in a prunable group, e.g. the
            classifier's rows).
        structure_group: long ``[S]``: the group index of each structure.
        layout_names: the names of the layout these structures were made for.
    """

    graph: StructureGraph
    groups: tuple[ChannelGroup, ...]
    offsets: tuple[int, ...]
    channel_structure: Tensor
    structure_group: Tensor
    layout_names: tuple[str, ...] = ()

    @property
    def n_structures(self) -> int:
        """S, the number of structures."""
        return int(self.structure_group.numel())

    def __len__(self) -> int:
        return self.n_structures

    def names(self) -> list[str]:
        """A readable name per structure: ``"<group>[<channel>]"``."""
        return [f"{g.name}[{c}]" for g in self.groups for c in range(g.size)]

    def group_slice(self, index: int) -> slice:
        """The structure ids of group ``index``."""
        start = self.offsets[index]
        return slice(start, start + self.groups[index].size)

    @contextlib.contextmanager
    def gates(self, model: nn.Module, values: Tensor) -> Iterator[None]:
        """Multiply every gate point by its structure's value while the context is open.

        Each group's gate points are the output of the BatchNorm right after each producer, or
        the producer's output when there is none; channel c of group g is multiplied by
        ``values[offsets[g] + c]`` (broadcast over the other dims). ``values`` may require grad:
        ∂loss/∂values is the sensitivity of the loss to each structure's gate (SOSP).

        Args:
            model: the model the structures were traced from.
            values: ``[S]`` gate values (1 = unchanged, 0 = structure removed).
        """
        if values.dim() != 1 or values.numel() != self.n_structures:
            raise ValueError(f"gate values must have shape [{self.n_structures}], got "
                             f"{list(values.shape)}")
        modules = dict(model.named_modules())
        handles = []
        try:
            for g, off in zip(self.groups, self.offsets, strict=True):
                for gate in g.gates:
                    if gate not in modules:
                        raise ConfigError(f"module {gate!r} is not in the model @ structures")
                    hook = _gate_hook(values, off, g.size, g.channel_dim)
                    handles.append(modules[gate].register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def gate_masks(self, keep: Tensor) -> dict[str, Tensor]:
        """Keep-masks of the non-weight parameters that gate each structure.

        For every prunable group: its producers' biases and its BatchNorms' weight and bias
        (when the model has them), each ``keep[offsets[g] : offsets[g] + size]``. With the
        producers' weight rows zeroed (the layout's mask), a removed structure's gated output is
        exactly zero.

        Args:
            keep: bool ``[S]``, True for kept structures.
        """
        out: dict[str, Tensor] = {}
        params = self.graph.param_names
        for i, g in enumerate(self.groups):
            piece = keep[self.group_slice(i)]
            names = [f"{p}.bias" for p in g.producers] + [
                f"{n}.{w}" for n in g.norms for w in ("weight", "bias")
            ]
            for name in names:
                if name in params:
                    out[name] = piece
        return out

    def unaffine_norms(self) -> list[str]:
        """BatchNorms of prunable groups without affine parameters (they cannot gate exactly)."""
        params = self.graph.param_names
        return [n for g in self.groups for n in g.norms if f"{n}.weight" not in params]


def _gate_hook(values: Tensor, offset: int, size: int, dim: int) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        gate = values[offset : offset + size].to(output.dtype)
        shape = [1] * output.dim()
        shape[dim] = size
        return output * gate.view(shape)

    return hook


def attach_structures(mask: Any, layout: ParamLayout, model: nn.Module) -> ParamLayout:
    """``layout`` with traced structures when ``mask`` prunes coupled channels, else unchanged.

    The pipeline calls this once per run: structures are traced when the mask applier's
    granularity is ``channel`` and its config has ``coupled = true``.

    Raises:
        UnsupportedModelError: the model cannot be traced, or no selected channel is prunable
            (the reasons of the groups are listed).
    """
    config = getattr(mask, "config", None)
    if getattr(mask, "granularity", "weight") != "channel" or not getattr(config, "coupled", False):
        return layout
    graph = StructureGraph.trace(model)
    structures = graph.structures(layout)
    if structures.n_structures == 0:
        why = "; ".join(
            f"{g.name}: {g.reason or 'weights not all selected'}" for g in graph.groups
        ) or "the model has no Conv or Linear producers"
        raise UnsupportedModelError(
            f"no selected channel can be pruned ({why}) @ prune.targets"
        )
    unaffine = structures.unaffine_norms()
    if unaffine and getattr(config, "remove", False):
        raise UnsupportedModelError(
            f"BatchNorm layers without affine parameters ({', '.join(unaffine)}) cannot be "
            "gated exactly, so their channels cannot be removed without changing the model; "
            "exclude their producers with prune.ignore or set mask.remove = false @ mask.remove"
        )
    if unaffine:
        warnings.warn(
            f"BatchNorm layers without affine parameters ({', '.join(unaffine)}) cannot be "
            "gated exactly: a masked channel outputs -mean/std instead of 0, so the masked and "
            "the physically smaller model differ (removal refuses them)",
            stacklevel=2,
        )
    return layout.with_structures(structures)


def apply_removal(model: nn.Module, kept_indices: Any, **kwargs: Any) -> Any:
    """Shrink a fresh ``model`` to the kept channels of a removal (see
    :func:`curvprune.removal.apply_removal`; here for ``structure.json`` readers)."""
    from curvprune.removal import apply_removal as apply

    return apply(model, kept_indices, **kwargs)
