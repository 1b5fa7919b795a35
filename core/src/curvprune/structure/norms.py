"""Normalisations that read several channels at once, and channel-wise parameters.

Rules of the structure tracer (:class:`curvprune.structure.trace.Tracer` mixes them in):

* **GroupNorm** (``G`` groups of ``w = C / G`` channels) normalises each group of ``w``
  consecutive channels with that group's own mean and variance. Removing *whole* GroupNorm
  groups leaves every other group's statistics untouched, so the masked and the smaller model
  agree exactly: the channel group keeps its channels in **blocks** of ``w`` (one structure is a
  whole GroupNorm group; ``num_groups`` follows on removal). ``w = 1`` (instance-norm-like) is
  a per-channel op, like BatchNorm. A GroupNorm reading a concatenation or a window of its
  channels is refused (its groups would straddle other channels).
* **LayerNorm over the channels** (``nn.LayerNorm((C,))`` on a channels-last tensor, or
  torchvision's ``LayerNorm2d`` on dim 1 of a map) normalises each position over *all* C
  channels. No removal keeps that exactly: a masked channel is a zero that still counts in
  the mean and the variance, a removed one does not count at all. Removal slices γ, β and
  ``normalized_shape`` (what Torch-Pruning's ``LayernormPruner`` does, without saying so), and
  the group lists the norm in ``renorms``: the smaller model equals the masked model *with
  those LayerNorms' statistics taken over the kept channels only* (the channels truly absent),
  which :func:`kept_statistics` installs. A LayerNorm with no affine weight is refused (a
  masked channel would be −mean/std, not 0), as is a functional ``F.layer_norm``.
* **Channel-wise parameters** (a ConvNeXt layer scale ``γ`` of shape ``[C, 1, 1]`` multiplying
  a map, read by a ``get_attr`` node): the product keeps a zero channel zero, so it passes the
  channels on and the parameter is sliced along its channel dim on removal (``scales``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvprune.structure.trace_ops import OPAQUE, Cat, Chan, Param, is_leaf_norm

__all__ = ["NormRules", "kept_statistics"]


class NormRules:
    """Tracer rules for LayerNorm, GroupNorm and channel-wise parameters (a mixin of
    :class:`curvprune.structure.trace.Tracer`; it uses the tracer's records)."""

    def init_norm_rules(self) -> None:
        self.renorms: dict[int, list[str]] = {}  # elem -> LayerNorms renormalised on removal
        self.blocks: dict[int, list[tuple[int, str]]] = {}  # elem -> (block width, by what)
        self.scales: dict[int, list[tuple[str, int, int, int, int | None, int]]] = {}
        self.gate_dim: dict[int, int] = {}  # slot -> dim of the channels at its point
        self.splits: dict[int, list[tuple[str, tuple[tuple[int, int], ...]]]] = {}  # reshapes

    def channel_pos(self, chan: Chan) -> int:
        """The dim of ``chan``'s channels, counted from the end when the rank is unknown."""
        return 1 if chan.kind == "conv" else -1

    def visit_channel_norm(self, node: Any, name: str, module: nn.Module, x: Any) -> Any:
        """A LayerNorm or GroupNorm reading channel values ``x``."""
        if not isinstance(x, (Chan, Cat)):
            return x
        label = f"{type(module).__name__} {name!r}"
        total = self.total(x)
        if self.dirty(x):
            return OPAQUE
        if isinstance(module, nn.GroupNorm):
            return self.group_norm(node, name, module, x, label, total)
        first_dim = is_leaf_norm(module)
        want = "conv" if first_dim else "linear"
        if tuple(module.normalized_shape) != (total,) or x.kind != want:
            where = "dim 1" if first_dim else "the last dim"
            self.bad(x, f"{label} normalises {tuple(module.normalized_shape)} on {where}, not "
                        f"the {total} channels alone")
            return OPAQUE
        if getattr(module, "weight", None) is None:
            self.bad(x, f"{label} has no affine weight: a masked channel would be -mean/std, "
                        "not 0")
            return OPAQUE
        self.widths[name] = total
        parts = []
        for chan, offset in self.parts(x):
            self.span(name, "norm", offset, chan)
            self.norms[chan.elem].append((name, offset, chan.lo, chan.hi, chan.step))
            self.renorms.setdefault(chan.elem, []).append(name)
            slot = self.slot(name, offset, chan.elem, chan.lo, chan.hi, chan.step)
            self.gate_dim[slot] = self.channel_pos(chan)
            parts.append((attrs.evolve(chan, chain=slot), offset))
        return parts[0][0] if isinstance(x, Chan) else Cat(tuple(parts), x.kind)

    def group_norm(self, node: Any, name: str, module: nn.GroupNorm, x: Any, label: str,
                   total: int) -> Any:
        if x.kind != "conv" or module.num_channels != total:
            self.bad(x, f"{label} does not act on the {total} channels on dim 1")
            return OPAQUE
        if not module.affine:
            self.bad(x, f"{label} has no affine parameters: a masked channel would be "
                        "-mean/std, not 0")
            return OPAQUE
        width = module.num_channels // module.num_groups
        if width > 1:
            if not isinstance(x, Chan) or x.lo or x.hi is not None:
                self.bad(x, f"{label} reads a concatenation or a chunk: its groups of {width} "
                            "channels would straddle other channels")
                return OPAQUE
            self.blocks.setdefault(x.elem, []).append(
                (width, f"{label} ({module.num_groups} groups of {width} channels)"))
        return self.per_channel(node, name, "norm", x, module.num_channels)

    def visit_param(self, node: Any) -> Any:
        """A ``get_attr`` node: a :class:`Param` for a parameter or buffer tensor."""
        try:
            value = self.gm.get_parameter(str(node.target))
        except AttributeError:
            try:
                value = self.gm.get_buffer(str(node.target))
            except AttributeError:
                return OPAQUE
        return Param(str(node.target), tuple(value.shape))

    def layer_scale(self, node: Any, x: Chan | Cat, param: Param, where: str) -> Any:
        """``param * x`` (or ``x * param``): a scale per channel (sliced with the channels), or
        one number for all channels (passed)."""
        shape = param.shape
        if all(s == 1 for s in shape):
            return self.passed(node, x)
        total = self.total(x)
        if x.kind == "conv":
            rank = self.rank_of(self.parts(x)[0][0])
            dim = len(shape) - (rank - 1)  # dim 1 of the map, aligned from the right
        else:
            dim = len(shape) - 1
        others = [s for i, s in enumerate(shape) if i != dim]
        if x.kind == "flat" or not 0 <= dim < len(shape) or shape[dim] != total \
                or any(s != 1 for s in others):
            self.bad(x, f"{where} multiplies the channels by parameter {param.name!r} of shape "
                        f"{list(shape)}, not one scale per channel")
            return OPAQUE
        for chan, offset in self.parts(x):
            self.span(param.name, "scale", offset, chan)
            self.scales.setdefault(chan.elem, []).append(
                (param.name, dim, offset, chan.lo, chan.hi, chan.step))
        return self.passed(node, x)


@contextlib.contextmanager
def kept_statistics(model: nn.Module, structures: Any, keep: Tensor) -> Iterator[None]:
    """Within the context, every LayerNorm that a removal of ``keep`` would renormalise takes
    its mean and variance over the kept channels only (removed channels output 0).

    With the structures masked (:meth:`curvprune.Structures.gate_masks` and the weight rows),
    this is the model in which the removed channels are truly absent, the function that
    :func:`curvprune.remove_structures` yields: the dense reference of a removal through
    LayerNorms (a plain masked model still counts the zeros in the statistics).
    """
    masks = structures.gate_masks(keep)
    modules = dict(model.named_modules())
    names = {n for g in structures.groups for n in getattr(g, "renorms", ())}
    handles = []
    try:
        for name in sorted(names):
            module = modules[name]
            kept = masks.get(f"{name}.weight")
            if kept is None or bool(kept.all()):
                continue
            dim = 1 if is_leaf_norm(module) else -1
            handles.append(module.register_forward_hook(_renormalise(kept, dim)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _renormalise(kept: Tensor, dim: int) -> Any:
    """A forward hook: the LayerNorm of the kept channels on ``dim``, zero elsewhere."""
    index = kept.nonzero().squeeze(1)

    def hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor:
        x = inputs[0].movedim(dim, -1)
        idx = index.to(x.device)
        bias = None if module.bias is None else module.bias[idx]
        part = F.layer_norm(x.index_select(-1, idx), (idx.numel(),), module.weight[idx], bias,
                            module.eps)
        out = torch.zeros_like(x).index_copy(-1, idx, part)
        return out.movedim(-1, dim)

    return hook
