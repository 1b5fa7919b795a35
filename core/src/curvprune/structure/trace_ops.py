"""What the structure tracer (:mod:`curvprune.structure.trace`) understands, and its values.

The op tables say which modules, functions and tensor methods keep channels apart and map a
zero channel to zero (pass-through), which scale, add, multiply, concatenate or flatten, and
which map zero to a nonzero value but may still gate a channel (sigmoid-like, the
squeeze-and-excitation scale). The abstract values are what the tracer stores per fx node:
:class:`Chan` (the channels of one element), :class:`Cat` (a channel concatenation of
elements at offsets) and :data:`OPAQUE` (a tensor the tracer knows nothing about).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ADD", "ADD_METHODS", "CAT", "CHUNK", "CONV", "Cat", "Chan", "FLATTEN_FUNCTIONS", "GATE_FUNCTIONS",
    "GATE_METHODS", "GATE_MODULES", "META_ATTRS", "META_METHODS", "MIXING_FUNCTIONS",
    "MIXING_NORMS", "MUL", "MUL_METHODS", "NORM",
    "Grouped", "OPAQUE", "Opaque", "PASS_FUNCTIONS", "PASS_METHODS", "PASS_MODULES", "Param",
    "SCALE",
    "SCALE_METHODS", "Sizes", "VIEW_METHODS", "arg", "chans", "is_leaf", "is_leaf_norm",
    "is_leaf_pass", "unique",
]

#: Modules that map a zero channel to a zero channel and keep channels apart.
PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Hardshrink,
    nn.Softshrink, nn.Identity,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)

#: Functions and tensor methods with the same property.
PASS_FUNCTIONS: frozenset[Any] = frozenset({
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.celu, F.selu,
    F.gelu, F.silu, F.mish, F.hardtanh, F.hardswish, F.tanh, torch.tanh, F.softsign,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
})
PASS_METHODS = frozenset({"relu", "relu_", "tanh", "tanh_", "clone", "contiguous", "detach"})

#: Channel-wise ops with f(0) ≠ 0 whose result may only *multiply* zero-preserving channels
#: (a squeeze-and-excitation scale): the product of a removed (zero) channel is still zero.
GATE_MODULES: tuple[type[nn.Module], ...] = (nn.Sigmoid, nn.Hardsigmoid)
GATE_FUNCTIONS: frozenset[Any] = frozenset({torch.sigmoid, F.sigmoid, F.hardsigmoid})
GATE_METHODS = frozenset({"sigmoid", "sigmoid_"})

#: Normalisations whose statistics mix channels: a removed (zero) channel still counts in the
#: masked model's mean and variance, so masking and removal differ. Refused.
MIXING_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
MIXING_FUNCTIONS: frozenset[Any] = frozenset({F.layer_norm, F.group_norm,
                                              F.local_response_norm})

ADD = frozenset({operator.add, operator.iadd, torch.add})
ADD_METHODS = frozenset({"add", "add_"})
MUL = frozenset({operator.mul, operator.imul, torch.mul})
MUL_METHODS = frozenset({"mul", "mul_"})
SCALE = frozenset({operator.mul, operator.imul, torch.mul, operator.truediv, operator.itruediv})
SCALE_METHODS = frozenset({"mul", "mul_", "div", "div_"})
CAT = frozenset({torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)})
CHUNK = frozenset({torch.chunk})
FLATTEN_FUNCTIONS = frozenset({torch.flatten})
VIEW_METHODS = frozenset({"view", "reshape"})
META_METHODS = frozenset({"size", "dim", "numel", "ndimension"})
META_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: Library modules kept as fx leaves and passed through: they multiply each sample by one
#: number (0 or 1/p), so a zero channel stays zero and channels stay apart.
_LEAF_PASS = {("torchvision.ops.stochastic_depth", "StochasticDepth")}


#: Library LayerNorms over dim 1 of a channel map (channels first), kept as fx leaves so that
#: the tracer sees one norm module rather than permute, layer_norm, permute.
_LEAF_NORMS = {("torchvision.models.convnext", "LayerNorm2d")}


def is_leaf_pass(module: nn.Module) -> bool:
    """Whether ``module`` is a known library module traced as a leaf and passed through."""
    return (type(module).__module__, type(module).__name__) in _LEAF_PASS


def is_leaf_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a known channels-first LayerNorm traced as a leaf."""
    return (type(module).__module__, type(module).__name__) in _LEAF_NORMS


def is_leaf(module: nn.Module) -> bool:
    """Whether the structure tracer keeps ``module`` as an fx leaf (besides torch.nn's)."""
    return is_leaf_pass(module) or is_leaf_norm(module)


@attrs.define
class Chan:
    """Abstract value of a traced tensor whose channels belong to one element (producer call).

    ``kind``: ``conv`` (channels on dim 1 of a map), ``linear`` (features on the last dim) or
    ``flat`` (a flattened map: each channel a block of consecutive features). ``chain``: the
    gate slot whose point every path from here to a consumer still passes through (a private
    chain: single users, no merge), else None. ``nonzero``: why a zero channel is no longer
    zero here (after a sigmoid), else None; such a value may only multiply another channel.
    ``lo``, ``hi``: the window of the element's channels this value holds (a chunk of it).
    ``rank``: the tensor rank of a channel map whose rank is not its element's (a Linear's
    features permuted to dim 1 of a map), else None. ``step``: inside a :class:`Cat`, channel
    ``i`` of the window sits at ``offset + step * i`` (> 1 after a channel shuffle interleaves
    several windows).
    """

    elem: int
    kind: str
    chain: int | None
    nonzero: str | None = None
    lo: int = 0
    hi: int | None = None  # the element's channels [lo, hi) after a torch.chunk; None: all
    rank: int | None = None
    step: int = 1


@attrs.define
class Cat:
    """A channel concatenation: ``parts`` are ``(Chan, offset)`` in channel order."""

    parts: tuple[tuple[Chan, int], ...]
    kind: str


class Opaque:
    """A tensor the tracer knows nothing about (the input, an unknown op's output)."""


OPAQUE = Opaque()


class Param(Opaque):
    """A parameter or buffer read by a ``get_attr`` node (a layer scale): opaque to every op
    but a channel-wise product, which slices it with the channels it multiplies."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


@attrs.frozen
class Grouped:
    """A channel map viewed as ``[N, groups, C / groups, ...]`` (``transposed``: after swapping
    those two dims): the first two steps of a channel shuffle."""

    value: Any
    groups: int
    transposed: bool = False


@attrs.frozen
class Sizes:
    """``x.size()`` / ``x.shape`` of a traced channel value, or one entry of it (``dim``),
    divided by ``div`` (``x.size(1) // g``): lets the tracer check that a view's sizes are the
    tensor's own, not literals that a removal would make stale."""

    of: Any
    dim: int | None = None
    div: int = 1


def chans(value: Any) -> list[Chan]:
    """Every :class:`Chan` inside nested args (the parts of a :class:`Cat` included)."""
    out: list[Chan] = []

    def walk(v: Any) -> None:
        if isinstance(v, Chan):
            out.append(v)
        elif isinstance(v, Cat):
            out.extend(c for c, _ in v.parts)
        elif isinstance(v, Grouped):
            walk(v.value)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item)
        elif isinstance(v, dict):
            for item in v.values():
                walk(item)

    walk(value)
    return out


def arg(args: Sequence[Any], kwargs: dict[str, Any], pos: int, key: str, default: Any) -> Any:
    """Positional argument ``pos`` or keyword ``key`` of a call."""
    if len(args) > pos:
        return args[pos]
    return kwargs.get(key, default)


def unique(items: Any) -> list[Any]:
    """``items`` without repeats, in first-seen order."""
    seen: dict[Any, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)
