"""Physical removal of pruned channel structures.

Removing a channel of a group (see :mod:`curvprune.structure.graph`) slices, in place:

* every producer: its weight rows (dim 0) and bias entries, and ``out_channels`` /
  ``out_features``;
* every BatchNorm of the group: γ, β, ``running_mean``, ``running_var`` and ``num_features``
  (``num_batches_tracked`` is kept); a LayerNorm's γ, β and ``normalized_shape`` (its
  statistics then run over the kept channels: :mod:`curvprune.structure.norms`); a GroupNorm's
  γ, β, ``num_channels`` and ``num_groups`` (whole groups go);
* every channel-wise parameter multiplying the channels (a layer scale) or added to them (a
  ViT's position embedding and class token: ``embeddings``), along its channel dim;
* every ``nn.MultiheadAttention`` reading the channels: ``in_proj_weight``'s input columns and
  ``embed_dim`` (``kdim``, ``vdim``), the module becoming a ``HeadPrunedMultiheadAttention``;
  its ``out_proj`` is a producer like any Linear;
* every literal channel count of a view (``literals``): the module attribute it stands for is
  set to the kept count, or, in a GraphModule, the node is rewritten
  (:mod:`curvprune.structure.literals`);
* every depthwise convolution the channels pass through: weight rows, bias entries,
  ``in_channels``, ``out_channels`` and ``groups``;
* every consumer: Conv weight columns (dim 1) and ``in_channels``; Linear columns in blocks of
  ``per_channel`` consecutive features per channel after a flatten, and ``in_features``. A
  grouped convolution's columns are its positions inside one conv group: every conv group
  keeps the same ones (a group's ``copies`` make that so), and ``groups`` stays.

A group inside a concatenation is sliced at its offset in the modules reading it; several
groups slicing one module (a consumer of one and a producer of another, or the parts of a
concatenation) are combined into one index per module and role over its original width.

Parameters are replaced by new :class:`torch.nn.Parameter` objects, so **any optimizer built
before the removal must be rebuilt** (its state refers to the old tensors). Everything is
checked first and computed out of place; the model is changed only when every check passed
(nothing half-written on an error).

A masked structure (weights, bias and BN γ, β zero: :meth:`curvprune.Structures.gate_masks`)
outputs exactly zero, so the removed model computes the same function as the masked one.

FLOPs and parameters before and after come from :mod:`curvprune.structure.counting`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from curvprune.errors import ConfigError, UnsupportedModelError
from curvprune.structure.attention import HeadGroup, plan_head_removal
from curvprune.structure.attention_mha import narrow_embed
from curvprune.structure.counting import count_flops_params, count_params
from curvprune.structure.graph import ChannelGroup, StructureGraph, Structures
from curvprune.structure.hf_mlp import MlpGroup, plan_mlp_removal
from curvprune.structure.literals import rewrite_literals
from curvprune.structure.reshapes import rewrite_splits

__all__ = ["RemovalResult", "apply_removal", "remove_structures"]

_SCHEMA = "curvprune.structure/1"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@attrs.frozen
class RemovalResult:
    """What a removal did.

    Attributes:
        params_before, params_after: Conv and Linear weights and biases.
        flops_before, flops_after: FLOPs per sample (None without an example input).
        kept: for each group (by name), ``[kept, size]`` channels.
        kept_indices: for each group that lost channels, the indices of the kept ones
            (ascending): the input of :func:`apply_removal`, JSON-able.
        layer_ratios: for each producer module, the fraction of its output channels removed.
    """

    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    kept: dict[str, list[int]]
    kept_indices: dict[str, list[int]]
    layer_ratios: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (the ``structure`` entry of ``result.json``)."""
        return {
            "params_before": self.params_before,
            "params_after": self.params_after,
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "kept": {k: list(v) for k, v in self.kept.items()},
            "layer_ratios": dict(self.layer_ratios),
        }


# --------------------------------------------------------------------------------------------
# Removal
# --------------------------------------------------------------------------------------------
def remove_structures(
    model: nn.Module,
    structures: Structures,
    keep: Tensor,
    *,
    example_input: Tensor | None = None,
) -> RemovalResult:
    """Remove, in place, every structure with ``keep`` False.

    Args:
        model: the model ``structures`` were traced from (same architecture, unchanged since).
        structures: the prunable structures (:meth:`StructureGraph.structures`).
        keep: bool ``[S]``, True for kept structures; all True leaves the model as it is.
        example_input: an input batch, to count FLOPs before and after (optional).

    Returns:
        Counts before and after, kept channels and kept indices per group.

    Raises:
        ConfigError: ``keep`` has the wrong shape, or removes every channel of a group.
        UnsupportedModelError: a group cannot be removed (reason named), a group's BatchNorm
            has no affine parameters, or the model no longer matches the structures.
            On any error the model is untouched.
    """
    if keep.dtype != torch.bool or tuple(keep.shape) != (structures.n_structures,):
        raise ConfigError(
            f"keep must be bool [{structures.n_structures}], got {keep.dtype} "
            f"{list(keep.shape)} @ keep"
        )
    keep = keep.cpu()
    plan: list[tuple[ChannelGroup, Tensor]] = []
    for i, group in enumerate(structures.groups):
        kept = keep[structures.group_slice(i)]
        if not bool(kept.all()):
            plan.append((group, kept.nonzero().squeeze(1)))
    kept_counts = {
        g.name: [int(keep[structures.group_slice(i)].sum()), g.size]
        for i, g in enumerate(structures.groups)
    }
    return _remove(model, plan, structures.groups, kept_counts, example_input)


def apply_removal(
    model: nn.Module,
    kept_indices: Mapping[str, Sequence[int]],
    *,
    example_input: Tensor | None = None,
) -> RemovalResult:
    """Rebuild the smaller architecture of a removal on a fresh model, in place.

    ``kept_indices`` is :attr:`RemovalResult.kept_indices`: for each group name, the channels
    to keep; a run's ``structure.json`` content (``{"schema": ..., "kept_indices": {...}}``)
    is accepted as it is. The model is traced, the named groups are sliced, and a state_dict
    saved from the removed model then loads into it.

    Raises:
        ConfigError: an unknown group name, or indices out of range, repeated or empty.
        UnsupportedModelError: a named group cannot be removed (the reason is named), or the
            model cannot be traced. On any error the model is untouched.
    """
    if not isinstance(kept_indices, Mapping):
        raise ConfigError(f"kept indices must map group names to lists, got "
                          f"{type(kept_indices).__name__} @ kept_indices")
    if isinstance(kept_indices.get("kept_indices"), Mapping):  # a structure.json
        schema = kept_indices.get("schema", _SCHEMA)
        if schema != _SCHEMA:
            raise ConfigError(f"unknown structure schema {schema!r} (expected {_SCHEMA!r}) "
                              "@ structure.json")
        kept_indices = kept_indices["kept_indices"]
    graph = StructureGraph.trace(model, heads_fallback=True)
    plan: list[tuple[ChannelGroup, Tensor]] = []
    kept_counts: dict[str, list[int]] = {}
    for name, indices in kept_indices.items():
        if not isinstance(indices, Sequence) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in indices
        ):
            raise ConfigError(f"kept indices of group {name!r} must be a list of integers "
                              f"@ kept_indices.{name}")
        group = next((g for g in graph.groups if g.name == name), None)
        if group is None:
            raise ConfigError(
                f"no channel group {name!r} in {type(model).__name__} (groups: "
                f"{', '.join(g.name for g in graph.groups)}) @ kept_indices"
            )
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if index.numel() and (
            bool((index < 0).any()) or bool((index >= group.size).any())
            or bool((index[1:] <= index[:-1]).any())
        ):
            raise ConfigError(
                f"kept indices of group {name!r} must be ascending, distinct and in "
                f"[0, {group.size}) @ kept_indices.{name}"
            )
        plan.append((group, index))
        kept_counts[name] = [int(index.numel()), group.size]
    return _remove(model, plan, [g for g, _ in plan], kept_counts, example_input)


def _remove(
    model: nn.Module,
    plan: list[tuple[ChannelGroup, Tensor]],
    groups: Sequence[ChannelGroup],
    kept_counts: dict[str, list[int]],
    example_input: Tensor | None,
) -> RemovalResult:
    """Check every group of ``plan``, compute every new tensor, then swap them in.

    ``groups`` and ``kept_counts`` (kept and total channels by group name) are reported.
    """
    modules = dict(model.named_modules())
    heads = _head_swaps(plan, modules)  # heads, MLP units: checked and computed, not applied
    channel_plan = [(group, index) for group, index in plan
                    if not isinstance(group, (HeadGroup, MlpGroup))]
    cuts: dict[tuple[str, str], _Cut] = {}
    for group, index in channel_plan:
        _group_cuts(group, index, modules, cuts)
    updates = [_checked(name, what, cut, _owner(modules, name, what))
               for (name, what), cut in cuts.items()]
    splits = {node: windows for group, _ in plan for node, windows in group.splits}
    kept_channels = {node: _channel_keep(group, index) for group, index in plan
                     for node, _ in group.splits}
    literals = [(record, int(_channel_keep(group, index).sum())) for group, index in plan
                for record in group.literals]
    try:
        rewrite = rewrite_splits(model, splits, kept_channels)
        relabel = rewrite_literals(model, literals)
    except ValueError as exc:
        raise UnsupportedModelError(f"{exc} @ model") from None
    if example_input is not None:
        flops_before, params_before = count_flops_params(model, example_input)
    else:
        flops_before, params_before = None, count_params(model)
    for swap in heads:  # every check passed: attention modules lose their heads
        swap()

    # A module may be sliced by several groups (a consumer of one and producer of another, or
    # a concatenation of several): each (module, role) gets one index over its original width.
    _apply_updates(updates)
    rewrite()
    relabel()
    if example_input is not None:
        flops_after, params_after = count_flops_params(model, example_input)
    else:
        flops_after, params_after = None, count_params(model)
    layer_ratios = {
        producer: 1.0 - kept_counts[group.name][0] / group.size
        for group in groups
        for producer in group.producers
    }
    return RemovalResult(
        params_before=params_before,
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        kept=kept_counts,
        kept_indices={g.name: index.tolist() for g, index in plan},
        layer_ratios=layer_ratios,
    )


def _head_swaps(plan: list[tuple[ChannelGroup, Tensor]],
                modules: Mapping[str, nn.Module]) -> list[Any]:
    """Check and compute the removal of the attention heads and Hugging Face MLP units in
    ``plan``; callables applying it (:func:`curvprune.structure.attention.plan_head_removal`,
    :func:`curvprune.structure.hf_mlp.plan_mlp_removal`)."""
    swaps = []
    for group, index in plan:
        if isinstance(group, MlpGroup):
            swaps.append(plan_mlp_removal(group, index, modules))
            continue
        if not isinstance(group, HeadGroup):
            continue
        if index.numel() == 0:
            raise ConfigError(
                f"removal would leave attention module {group.name!r} with no head; keep at "
                "least one (mask.min_channels >= 1) @ mask.min_channels")
        swaps.append(plan_head_removal(group, index, modules))
    return swaps


@attrs.define
class _Cut:
    """The kept positions of one (module, role), over its width at trace time."""

    keep: Tensor
    group: str


def _group_cuts(
    group: ChannelGroup, index: Tensor, modules: Mapping[str, nn.Module],
    cuts: dict[tuple[str, str], _Cut],
) -> None:
    """Checks for one group; mark the positions it removes in every module it touches."""
    if not group.removable:
        raise UnsupportedModelError(
            f"cannot remove channels of group {group.name!r}: {group.reason} @ model"
        )
    if index.numel() == 0:
        raise ConfigError(
            f"removal would leave group {group.name!r} (producers {', '.join(group.producers)}) "
            "with no channel; keep at least one (mask.min_channels >= 1) @ mask.min_channels"
        )
    keep = _channel_keep(group, index)
    for node, windows in group.splits:
        for j, (lo, hi) in enumerate(windows):
            if hi > lo and not bool(keep[lo:hi].any()):
                raise ConfigError(
                    f"removal would leave piece {j} of torch.split at node {node!r} (group "
                    f"{group.name!r}, channels {lo}..{hi - 1}) with no channel; keep one @ keep"
                )

    def cut(name: str, what: str, width: int | None, at: int, lo: int, hi: int,
            per: int = 1, step: int = 1) -> None:
        owner = _owner(modules, name, what)
        if owner is None:
            raise UnsupportedModelError(
                f"module {name!r} of group {group.name!r} is not in the model @ model"
            )
        size = _width(owner, what)
        if size is None or (width is not None and size != width) \
                or (at + step * (hi - lo - 1) + 1) * per > size:
            raise UnsupportedModelError(
                f"module {name!r} has {size} {'input' if what == 'in' else 'output'} channels, "
                f"not what group {group.name!r} had when traced: the model changed since @ model"
            )
        entry = cuts.setdefault((name, what), _Cut(torch.ones(size, dtype=torch.bool),
                                                   group.name))
        places = torch.arange(at, at + step * (hi - lo), step)
        features = (places[:, None] * per + torch.arange(per)[None, :]).reshape(-1)
        entry.keep[features] &= keep[lo:hi].repeat_interleave(per)

    for name in group.producers:
        cut(name, "out", group.channels, 0, 0, group.channels)
    for name, at, lo, hi, step in group.laid("norms"):
        mod = modules.get(name)
        if mod is not None and not getattr(mod, "affine", True):
            raise UnsupportedModelError(
                f"BatchNorm {name!r} has no affine parameters, so a masked channel of group "
                f"{group.name!r} outputs -mean/std, not 0: removing it would change the "
                "model's function @ model"
            )
        cut(name, "norm", None, at, lo, hi, 1, step)
    for name, at, lo, hi, step in group.laid("depthwise"):
        cut(name, "dw", None, at, lo, hi, 1, step)
    for (name, per), at, lo, hi, step in group.laid("consumers"):
        cut(name, "in", None, at, lo, hi, per, step)
    for (name, dim), at, lo, hi, step in group.laid("scales"):
        cut(name, f"scale{dim}", None, at, lo, hi, 1, step)
    for name, dim, _ in group.embeddings:  # a position embedding, a class token
        cut(name, f"scale{dim}", group.channels, 0, 0, group.channels)


def _channel_keep(group: ChannelGroup, index: Tensor) -> Tensor:
    """Bool per channel of ``group``: True for the channels of the kept structures."""
    keep = torch.zeros(group.channels, dtype=torch.bool)
    keep[group.channel_index(index)] = True
    return keep


def _owner(modules: Mapping[str, nn.Module], name: str, what: str) -> Any:
    """The module ``name``, or for a channel-wise parameter (role ``scale<dim>``) the tuple
    ``(module, attribute, dim)`` holding it; None when absent."""
    if not what.startswith("scale"):
        return modules.get(name)
    path, _, attr = name.rpartition(".")
    module = modules.get(path)
    if not isinstance(getattr(module, attr, None), torch.Tensor):
        return None
    return (module, attr, int(what[5:]))


def _width(mod: Any, what: str) -> int | None:
    if what.startswith("scale"):
        module, attr, dim = mod
        shape = getattr(module, attr).shape
        return int(shape[dim]) if dim < len(shape) else None
    if what == "norm":
        if isinstance(mod, nn.LayerNorm):
            return int(mod.normalized_shape[-1])
        if isinstance(mod, nn.GroupNorm):
            return mod.num_channels
        return getattr(mod, "num_features", None)
    if what == "in" and isinstance(mod, nn.MultiheadAttention):
        return int(mod.embed_dim)
    if what == "in":
        return mod.in_channels if isinstance(mod, _CONV) else getattr(mod, "in_features", None)
    return mod.out_channels if isinstance(mod, _CONV) else getattr(mod, "out_features", None)


def _checked(name: str, what: str, cut: _Cut, mod: Any) -> tuple[Any, str, Tensor]:
    """``(module, role, kept index)``; for a grouped convolution's input, the kept positions
    inside one conv group (every group must keep the same ones)."""
    index = cut.keep.nonzero().squeeze(1)
    if isinstance(mod, nn.GroupNorm):
        rows = cut.keep.reshape(mod.num_groups, -1)
        if not bool((rows == rows[:, :1]).all()):
            raise UnsupportedModelError(
                f"GroupNorm {name!r} would lose part of one of its {mod.num_groups} groups "
                f"(group {cut.group!r}); only whole groups keep the others' statistics @ model"
            )
    groups = getattr(mod, "groups", 1)
    if what in ("in", "out") and groups > 1:
        slots = cut.keep.reshape(groups, -1)
        if not bool((slots == slots[:1]).all()):
            raise UnsupportedModelError(
                f"grouped convolution {name!r} (groups={groups}) would keep different channels "
                f"in its groups (group {cut.group!r}) @ model"
            )
        if what == "in":
            index = slots[0].nonzero().squeeze(1)
    return mod, what, index


def _apply_updates(updates: list[tuple[Any, str, Tensor]]) -> None:
    """Slice in place; every check has passed already."""
    for mod, what, index in updates:
        if what.startswith("scale"):
            module, attr, dim = mod
            old = getattr(module, attr)
            new = old.detach().index_select(dim, index.to(old.device))
            if attr in module._parameters:
                _set_param(module, attr, new)
            else:  # a buffer stays a buffer
                setattr(module, attr, new.clone())
            continue
        if isinstance(mod, nn.MultiheadAttention):  # the stream it reads: in_proj columns
            narrow_embed(mod, index)
            continue
        index = index.to(mod.weight.device)
        if what in ("out", "dw"):
            _set_param(mod, "weight", mod.weight.detach().index_select(0, index))
            if mod.bias is not None:
                _set_param(mod, "bias", mod.bias.detach().index_select(0, index))
            if isinstance(mod, nn.Linear):
                mod.out_features = int(index.numel())
            else:
                mod.out_channels = int(index.numel())
            if what == "dw":
                mod.in_channels = mod.groups = int(index.numel())
        elif what == "norm":
            _set_param(mod, "weight", mod.weight.detach().index_select(0, index))
            if mod.bias is not None:
                _set_param(mod, "bias", mod.bias.detach().index_select(0, index))
            for buffer in ("running_mean", "running_var"):
                value = getattr(mod, buffer, None)
                if value is not None:
                    setattr(mod, buffer, value.index_select(0, index).clone())
            if isinstance(mod, nn.LayerNorm):
                mod.normalized_shape = (int(index.numel()),)
            elif isinstance(mod, nn.GroupNorm):  # whole groups: the group width stays
                width = mod.num_channels // mod.num_groups
                mod.num_channels, mod.num_groups = int(index.numel()), int(index.numel()) // width
            else:
                mod.num_features = int(index.numel())
        else:
            _set_param(mod, "weight", mod.weight.detach().index_select(1, index))
            if isinstance(mod, nn.Linear):
                mod.in_features = int(index.numel())
            else:
                mod.in_channels = int(index.numel()) * mod.groups


def _set_param(module: nn.Module, name: str, value: Tensor) -> None:
    old = getattr(module, name)
    setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
