"""Per-structure sums over every parameter slice that removing the structure deletes.

Removing a channel structure (:func:`curvprune.remove_structures`) deletes, for channel c of its
group (every ``copies`` channel of it, every channel of its GroupNorm ``block``): each
producer's weight row c and bias entry c (all producers of a coupled residual stream, an
attention module's ``out_proj`` among them); each norm's γ_c and β_c (BatchNorm, LayerNorm,
GroupNorm); each depthwise convolution's weight row and bias entry of the channel; each
consumer's input columns of the channel (a Conv's column, a grouped Conv's column at c's place
in its conv group in that conv group's rows, the ``per_channel`` columns of a Linear after a
flatten, an attention module's ``in_proj_weight`` column); a layer scale's entry c; an
embedding's ``[..., c]`` slice (a ViT's class token, every position of its position
embedding), at the group's offsets, windows and shuffle strides. Removing an attention head
deletes its q, k, v rows and biases and its output-projection columns. The full table is in
:mod:`curvprune.builtin.group_entries`.

:func:`group_sums` adds ``fn(p)`` over exactly those entries, one sum per structure, so that a
magnitude score of a structure counts every parameter its removal takes away, not only its
producer's filter (the grouping of DepGraph, Fang et al., CVPR 2023, Eq. 6 with a sum over the
group's members). An entry several structures delete (an attention in-projection entry in a
head's row and a stream channel's column) counts in each of their sums, once. Entries that a
structure already removed (by the keep-mask) has deleted are left out of the other
structures' sums: a consumer's weight row never counts the columns of an input channel that
is gone. With ``fn = abs`` the sum is what the L1 mass of the model's parameters drops by when
the structure is removed; with ``fn = square`` the squared L2 mass; with ``fn = ones_like`` the
number of parameters removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvprune.builtin.group_entries import Axis, group_entries
from curvprune.tensors.layout import ParamLayout

__all__ = ["group_sums", "unsupported_group"]


def unsupported_group(structures: Any, model: nn.Module) -> str | None:
    """Why :func:`group_sums` cannot count some group exactly, or None.

    Every member the tracer records is counted (producers, norms of every kind, depthwise
    convolutions, Conv, Linear and attention consumers, layer scales, embeddings, attention
    heads and Hugging Face MLP units, at offsets, windows, strides, copies and blocks). What
    remains is a member the model no longer matches (a module or parameter missing, a width
    other than the trace's), named with its group.
    """
    return group_entries(structures, model)[1]


def _sums(values: Tensor, axes: list[Axis], dead: Tensor, out: Tensor) -> None:
    """Add the live entries of ``values`` (one parameter's ``fn``) to ``out`` ``[S + 1]``.

    Each entry counts once for every distinct live structure among its axes' ids (the slot
    ``S`` collects entries of no structure); entries with a dead id on any axis count nowhere.
    """
    device, n = values.device, values.dim()
    maps = [a.map(values.shape).to(device) for a in axes]
    none = out.numel() - 1
    live = None
    for m in maps:
        gone = (m >= 0) & dead[m.clamp_min(0)]
        live = ~gone if live is None else live & ~gone
    values = values * live.to(values.dtype)
    for i, (axis, m) in enumerate(zip(axes, maps, strict=True)):
        # an entry whose earlier axis names the same structure was counted there
        same = [maps[j] for j in range(i) if axes[j].groups & axis.groups]
        wide = {d for q in (m, *same) for d in range(n) if q.shape[d] != 1}
        r = values.sum([d for d in range(n) if d not in wide], keepdim=True) \
            if len(wide) < n else values
        for q in same:
            r = r * (q != m).to(r.dtype)
        narrow = [d for d in range(n) if m.shape[d] == 1 and r.shape[d] != 1]
        if narrow:
            r = r.sum(narrow, keepdim=True)
        ids = m.expand(r.shape).reshape(-1)
        out.index_add_(0, torch.where(ids >= 0, ids, none), r.reshape(-1))


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
            of the model's tensors); other parameters (biases, norms, unselected consumers,
            embeddings, layer scales) are read from the model.
        mask: the keep-mask over ``weights``, bool ``[d]``: masked weights count 0, and the
            entries of structures with no kept weight are left out of every sum.
        fn: an element-wise map to non-negative values (``Tensor.abs``, ``Tensor.square``).

    A member :func:`unsupported_group` names is left out (the rest is counted).

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
    out = torch.zeros(layout.n_structures + 1, dtype=weights.dtype, device=device)
    entries, _ = group_entries(structures, model)
    for name, axes in entries.items():
        source = selected.get(name)
        value = params[name].detach() if source is None else source
        _sums(fn(value.to(device=device, dtype=weights.dtype)), axes, dead, out)
    return out[:-1]
