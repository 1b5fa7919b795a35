"""Per-structure sums over every parameter slice that removing the structure deletes.

Removing a channel structure (:func:`curvprune.remove_structures`) deletes, for channel c of
its group (every ``copies`` channel of it):

* each producer's weight row c and bias entry c (all producers of a coupled residual
  stream);
* each norm's γ_c and β_c (BatchNorm; any 1-D affine parameter the group's ``norms`` hold);
* each depthwise convolution's weight row and bias entry of the channel;
* each consumer's input columns of the channel: column c of a Conv (for a grouped Conv, the
  column at c's position inside its conv group, in that conv group's rows), and the
  ``per_channel`` consecutive columns of a Linear layer after a flatten.

:func:`group_sums` adds ``fn(p)`` over exactly those entries, one sum per structure, so that a
magnitude score of a structure counts every parameter its removal takes away, not only its
producer's filter (the grouping of DepGraph, Fang et al., CVPR 2023, Eq. 6 with a sum over the
group's members). Entries that a structure already removed (by the keep-mask) has deleted are
left out of the other structures' sums: a consumer's weight row never counts the columns of an
input channel that is gone. With ``fn = abs`` the sum is what the L1 mass of the model's
parameters drops by when the structure is removed; with ``fn = square`` the squared L2 mass;
with ``fn = ones_like`` the number of parameters removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.tensors.layout import ParamLayout

__all__ = ["group_sums", "unsupported_group"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _Axes:
    """Structure id of each output row (dim 0) and each input channel of one parameter."""

    def __init__(self, rows: int, inputs: int) -> None:
        self.rows = torch.full((rows,), -1, dtype=torch.long)
        self.inputs = torch.full((max(inputs, 0),), -1, dtype=torch.long)


def unsupported_group(structures: Any, model: nn.Module) -> str | None:
    """Why :func:`group_sums` cannot count some group exactly, or None.

    Covered: producers, BatchNorm-like norms, depthwise convolutions and Conv/Linear consumers,
    at offsets and windows (concatenations, chunks), with grouped-conv copies. Not yet covered
    (the caller falls back to the producers' rows): channel strides after a shuffle, GroupNorm
    blocks, LayerNorms and layer scales over the channels, embedding parameters (a ViT's class
    token and position embedding), and entries that are not plain modules (attention
    in-projections).
    """
    modules = dict(model.named_modules())
    for g in structures.groups:
        if getattr(g, "block", 1) != 1:
            return f"group {g.name!r} has GroupNorm blocks"
        for what in ("renorms", "scales", "splits", "embeddings"):
            if getattr(g, what, ()):
                return f"group {g.name!r} has {what}"
        for what in ("norm_steps", "consumer_steps", "depthwise_steps"):
            if any(step != 1 for step in getattr(g, what, ())):
                return f"group {g.name!r} has strided channels (a shuffle)"
        names = [*g.producers, *g.norms, *g.depthwise, *(m for m, _ in g.consumers)]
        missing = [n for n in names if n not in modules
                   or isinstance(modules[n], nn.MultiheadAttention)]
        if missing:
            return f"group {g.name!r} reads {missing[0]!r}, which is not a plain module"
    return None


def _input_width(module: nn.Module) -> int:
    if isinstance(module, _CONV):
        return int(module.in_channels)
    return int(getattr(module, "in_features", 0))


def _axes(structures: Any, model: nn.Module) -> dict[str, _Axes]:
    """For every parameter a removal slices, which structure owns each row and input channel."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    out: dict[str, _Axes] = {}

    def axes(name: str) -> _Axes | None:
        if name not in params:
            return None
        if name not in out:
            module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
            p = params[name]
            inputs = _input_width(module) if p.dim() >= 2 else 0
            out[name] = _Axes(int(p.shape[0]), inputs)
        return out[name]

    for g, first in zip(structures.groups, structures.offsets, strict=True):
        sid = torch.arange(first, first + g.size).repeat(g.copies)  # [channels]
        for p in g.producers:
            for suffix in ("weight", "bias"):
                a = axes(f"{p}.{suffix}")
                if a is not None:
                    a.rows[:] = sid
        for kind in ("norms", "depthwise"):
            for m, at, lo, hi in g.placed(kind):
                for suffix in ("weight", "bias"):
                    a = axes(f"{m}.{suffix}")
                    if a is not None:
                        a.rows[at : at + hi - lo] = sid[lo:hi]
        for (m, per), at, lo, hi in g.placed("consumers"):
            a = axes(f"{m}.weight")
            if a is not None:
                a.inputs[at * per : (at + hi - lo) * per] = sid[lo:hi].repeat_interleave(per)
    return out


def _per_input(values: Tensor, module: nn.Module) -> Tensor:
    """Sum ``values`` (a weight's shape) per input channel, ``[in_channels]`` (``in_features``).

    Input channel p of a Conv with ``groups = g`` is column ``p mod (in/g)`` of the rows of
    conv group ``p div (in/g)``.
    """
    groups = int(getattr(module, "groups", 1)) if isinstance(module, _CONV) else 1
    if groups == 1:
        return values.transpose(0, 1).reshape(values.shape[1], -1).sum(1)
    out_ch, per_group = values.shape[0], values.shape[1]
    blocks = values.reshape(groups, out_ch // groups, per_group, -1)
    return blocks.sum((1, 3)).reshape(-1)


def _live(values: Tensor, a: _Axes, dead: Tensor, module: nn.Module) -> Tensor:
    """``values`` with the entries of already removed structures zeroed."""
    rows = a.rows.to(values.device)
    row_dead = (rows >= 0) & dead[rows.clamp_min(0)]
    shape = [-1] + [1] * (values.dim() - 1)
    values = values * (~row_dead).to(values.dtype).view(shape)
    if values.dim() < 2 or a.inputs.numel() == 0:
        return values
    ins = a.inputs.to(values.device)
    in_dead = (ins >= 0) & dead[ins.clamp_min(0)]
    if not bool(in_dead.any()):
        return values
    groups = int(getattr(module, "groups", 1)) if isinstance(module, _CONV) else 1
    out_ch, per_group = values.shape[0], values.shape[1]
    keep = (~in_dead).to(values.dtype).view(groups, 1, per_group)  # [g, 1, in/g]
    keep = keep.expand(groups, out_ch // groups, per_group).reshape(out_ch, per_group)
    return values * keep.view(out_ch, per_group, *([1] * (values.dim() - 2)))


def group_sums(
    model: nn.Module,
    layout: ParamLayout,
    weights: Tensor,
    mask: Tensor,
    fn: Callable[[Tensor], Tensor],
) -> Tensor:
    """Σ ``fn(θ)`` over every parameter entry that removing each structure deletes, ``[S]``.

    Args:
        model: the model ``layout.structures`` were traced from.
        layout: the selected parameters, with traced structures attached.
        weights: the selected parameters' current values, flat ``[d]`` (used for them instead
            of the model's tensors); other parameters (biases, norms, unselected consumers)
            are read from the model.
        mask: the keep-mask over ``weights``, bool ``[d]``: masked weights count 0, and the
            entries of structures with no kept weight are left out of every sum.
        fn: an element-wise map to non-negative values (``Tensor.abs``, ``Tensor.square``).

    Raises:
        ValueError: ``layout`` has no traced structures.
    """
    structures = layout.structures
    if structures is None or not hasattr(structures, "groups"):
        raise ValueError("group sums need traced structures (mask.coupled = true) @ scorer")
    device = weights.device
    dead = ~layout.alive_structures(mask).to(device)
    selected = dict(zip(layout.names, layout.unflatten(weights * mask), strict=True))
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = torch.zeros(layout.n_structures, dtype=weights.dtype, device=device)
    for name, a in _axes(structures, model).items():
        source = selected.get(name)
        value = params[name].detach() if source is None else source
        module = modules[name.rsplit(".", 1)[0] if "." in name else ""]
        values = _live(fn(value.to(device=device, dtype=weights.dtype)), a, dead, module)
        rows = a.rows.to(device)
        hit = rows >= 0
        if bool(hit.any()):
            out.index_add_(0, rows[hit], values.reshape(values.shape[0], -1).sum(1)[hit])
        if values.dim() >= 2 and a.inputs.numel():
            ins = a.inputs.to(device)
            hit = ins >= 0
            if bool(hit.any()):
                out.index_add_(0, ins[hit], _per_input(values, module)[hit])
    return out
