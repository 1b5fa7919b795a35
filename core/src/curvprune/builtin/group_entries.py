"""Which parameter entries removing each channel structure deletes, axis by axis.

:func:`group_entries` reads the records :func:`curvprune.remove_structures` slices by and gives,
for every parameter a removal slices, one structure id per position along each sliced axis
(-1: no structure). An entry is deleted with structure s when s is the id of any of its axes.
For channel ``c`` of a group (each of its ``copies``, each channel of its GroupNorm ``block``):

* ``producers`` (Conv, Linear, an attention module's ``out_proj``): weight row c, bias entry c;
* ``norms`` (BatchNorm; LayerNorm, also listed in ``renorms``; GroupNorm, whole blocks): γ_c
  and β_c at the channel's place;
* ``depthwise``: the weight row and bias entry of the channel;
* ``consumers``: a Conv's or Linear's input column(s) of the channel (``per_channel``
  consecutive features after a flatten; for a grouped Conv the column at the channel's place
  in its conv group, in that conv group's rows); an ``nn.MultiheadAttention``'s
  ``in_proj_weight`` column c (all its ``3·inner`` rows);
* ``scales`` (a layer scale): entry c along its channel dim (a buffer holds no parameter);
* ``embeddings`` (a class token, a position embedding): the ``[..., c]`` slice, every token
  position of it.

Places follow the group's offsets, windows and strides (``*_steps``: after a channel shuffle,
channel ``lo + i`` sits at ``offset + step·i``). ``splits``, ``literals`` and gates hold no
parameter. Attention heads (:class:`~curvprune.structure.attention.HeadGroup`) and Hugging Face
MLP units (:class:`~curvprune.structure.hf_mlp.MlpGroup`) delete what
:func:`~curvprune.structure.attention.head_slices` and
:func:`~curvprune.structure.hf_mlp.mlp_slices` name (a head's q, k, v rows and biases and its
output-projection columns; a unit's up rows and biases and down column), the lists their
removals slice by.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.structure.attention import HeadGroup, head_slices
from curvprune.structure.hf_mlp import MlpGroup, mlp_slices

__all__ = ["Axis", "group_entries"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@attrs.define
class Axis:
    """The structure id of each position along one axis of one parameter.

    Attributes:
        dim: the parameter's axis.
        ids: long ``[width]``: the structure owning each position, -1 for none.
        groups: the indices of the groups that wrote ids here (two axes of one parameter can
            name the same structure only when they share a group).
        conv_groups: > 1 for the input channels of a grouped convolution: ``ids`` then runs
            over its ``in_channels`` (``groups`` times the weight's dim 1), channel p being
            column ``p mod (in/groups)`` in the rows of conv group ``p div (in/groups)``.
    """

    dim: int
    ids: Tensor
    groups: set[int] = attrs.field(factory=set)
    conv_groups: int = 1

    def map(self, shape: torch.Size) -> Tensor:
        """The ids as a long tensor broadcastable to a parameter of ``shape``: one id per
        position along :attr:`dim` (for a grouped convolution's input, per row and column)."""
        view = [1] * len(shape)
        if self.conv_groups > 1:
            g, out, per = self.conv_groups, int(shape[0]), int(shape[1])
            ids = self.ids.view(g, 1, per).expand(g, out // g, per).reshape(out, per)
            return ids.view(out, per, *view[2:])
        view[self.dim] = self.ids.numel()
        return self.ids.view(view)


def group_entries(structures: Any, model: nn.Module) -> tuple[dict[str, list[Axis]], str | None]:
    """For every parameter (by name) that removing some structure slices, its sliced axes;
    and why some member could not be placed (the first such reason), or None.

    A member that cannot be placed (a module or parameter missing, a width that does not
    match the trace: the model changed since) is left out; the rest is exact.
    """
    built = _Builder(model)
    for index, (g, first) in enumerate(zip(structures.groups, structures.offsets, strict=True)):
        built.group = index
        if isinstance(g, HeadGroup):
            built.head_group(g, first)
        elif isinstance(g, MlpGroup):
            built.mlp_group(g, first)
        else:
            built.channel_group(g, first)
    return {name: list(axes.values()) for name, axes in built.axes.items()}, built.problem


class _Builder:
    """Collects the axes of one model's parameters, group by group."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules())
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.axes: dict[str, dict[int, Axis]] = {}
        self.problem: str | None = None
        self.group = -1
        self.label = ""

    def refuse(self, why: str) -> None:
        if self.problem is None:
            self.problem = f"group {self.label!r}: {why}"

    def put(self, path: str, dim: int, places: Tensor, ids: Tensor, *,
            width: int | None = None, conv_groups: int = 1) -> None:
        """Structure ``ids`` at ``places`` along ``dim`` of the tensor at ``path`` (a module's
        attribute): nothing when it is a buffer or a plain tensor (it holds no parameter)."""
        owner, _, attr = path.rpartition(".")
        t = getattr(self.modules.get(owner), attr, None)
        if not isinstance(t, Tensor):
            self.refuse(f"{path!r} is not in the model")
        elif isinstance(t, nn.Parameter):  # by identity: a tied parameter has one name
            self.place(self.names[id(t)], t, dim, places, ids, width, conv_groups)

    def place(self, name: str, p: Tensor, dim: int, places: Tensor, ids: Tensor,
              width: int | None = None, conv_groups: int = 1) -> None:
        if p.dim() == 0:
            self.refuse(f"parameter {name!r} is a scalar")
            return
        dim %= p.dim()
        width = int(p.shape[dim]) if width is None else width
        axes = self.axes.setdefault(name, {})
        axis = axes.get(dim)
        if axis is None:
            axis = axes[dim] = Axis(dim, torch.full((width,), -1, dtype=torch.long),
                                    conv_groups=conv_groups)
        if axis.ids.numel() != width or axis.conv_groups != conv_groups:
            self.refuse(f"parameter {name!r} is sliced along dim {dim} in two ways")
            return
        if places.numel() and int(places.max()) >= width:
            self.refuse(f"parameter {name!r} has {width} positions along dim {dim}, fewer "
                        "than the trace placed: the model changed since")
            return
        axis.ids[places] = ids
        axis.groups.add(self.group)

    def rows(self, module: str, places: Tensor, ids: Tensor, *, whole: int | None = None) -> None:
        """Weight rows and bias entries of ``module`` (``whole``: the width they must have)."""
        mod = self.modules.get(module)
        if mod is None:
            self.refuse(f"module {module!r} is not in the model")
            return
        for suffix in ("weight", "bias"):
            p = getattr(mod, suffix, None)
            if not isinstance(p, nn.Parameter):
                continue
            if whole is not None and int(p.shape[0]) != whole:
                self.refuse(f"{module}.{suffix} has {int(p.shape[0])} rows, not the group's "
                            f"{whole}: the model changed since")
                continue
            self.place(self.names[id(p)], p, 0, places, ids)

    def channel_group(self, g: Any, first: int) -> None:
        self.label = g.name
        sid = g.expand(torch.arange(first, first + g.size))  # [channels]
        every = torch.arange(g.channels)
        for p in g.producers:
            self.rows(p, every, sid, whole=g.channels)
        for kind in ("norms", "depthwise"):
            for m, at, lo, hi, step in g.laid(kind):
                self.rows(m, at + step * torch.arange(hi - lo), sid[lo:hi])
        for (m, per), at, lo, hi, step in g.laid("consumers"):
            places = at + step * torch.arange(hi - lo)
            features = (places[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
            self.columns(m, features, sid[lo:hi].repeat_interleave(per))
        for (name, dim), at, lo, hi, step in g.laid("scales"):  # a buffer: no parameter
            self.put(name, dim, at + step * torch.arange(hi - lo), sid[lo:hi])
        for name, dim, _ in g.embeddings:
            self.put(name, dim, every, sid)

    def columns(self, module: str, features: Tensor, ids: Tensor) -> None:
        """Input columns of a consumer (a Conv, a Linear, an attention module's in-projection)."""
        mod = self.modules.get(module)
        if isinstance(mod, nn.MultiheadAttention):
            if not mod._qkv_same_embed_dim:
                self.refuse(f"attention module {module!r} has separate q, k, v projections")
                return
            self.put(f"{module}.in_proj_weight", 1, features, ids)
        elif isinstance(mod, _CONV):
            self.put(f"{module}.weight", 1, features, ids, width=int(mod.in_channels),
                     conv_groups=int(mod.groups))
        elif isinstance(getattr(mod, "weight", None), nn.Parameter) and mod.weight.dim() == 2:
            self.put(f"{module}.weight", 1, features, ids)
        else:
            self.refuse(f"consumer {module!r} ({type(mod).__name__}) has no input columns "
                        "known to the group sums")

    def sliced(self, owner: nn.Module, param: str, axis: int, ids: Tensor) -> None:
        t = getattr(owner, param)
        name = self.names.get(id(t))
        if name is None:
            self.refuse(f"parameter {param!r} of {type(owner).__name__} is not the model's")
        elif int(t.shape[axis]) != ids.numel():
            self.refuse(f"{name} has {int(t.shape[axis])} positions along dim {axis}, not the "
                        f"{ids.numel()} of its structures: the model changed since")
        else:
            self.place(name, t, axis, torch.arange(ids.numel()), ids)

    def head_group(self, g: HeadGroup, first: int) -> None:
        self.label = g.name
        module = self.modules.get(g.name)
        if module is None:
            self.refuse(f"attention module {g.name!r} is not in the model")
            return
        for owner, param, axis, unit, copies in head_slices(g, module):
            ids = first + torch.arange(g.size).repeat_interleave(unit).repeat(copies)
            self.sliced(owner, param, axis, ids)

    def mlp_group(self, g: MlpGroup, first: int) -> None:
        self.label = g.name
        block = self.modules.get(g.owner)
        if block is None:
            self.refuse(f"MLP module {g.owner!r} is not in the model")
            return
        for owner, param, axis in mlp_slices(g, block):
            self.sliced(owner, param, axis, first + torch.arange(g.size))
