"""Checking physical channel removal against masking: the equivalence every structure-coverage
test asserts (and a plugin adding removal rules can reuse).

:func:`check` traces ``model``, keeps the structures ``keep`` says (at least one per group),
and asserts three models agree on ``x``: the model with closed gates equals the masked model,
and the physically removed model equals the masked one with LayerNorm statistics over the
kept channels (:func:`curvprune.structure.norms.kept_statistics`; without channel-wise
LayerNorms that is the masked model itself).

:func:`assert_group_sums_match_removal` is the ground truth of per-structure group sums
(:func:`curvprune.builtin.group_saliency.group_sums`): each structure's count, L1 and squared
L2 equal what the model's parameters lose when that structure alone is removed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from curvprune.structure.graph import StructureGraph
from curvprune.structure.norms import kept_statistics
from curvprune.structure.removal import remove_structures
from curvprune.tensors.layout import DEFAULT_TARGETS, select_parameters
from curvprune.tensors.masks import MaskSet

__all__ = ["assert_group_sums_match_removal", "check", "gap", "masked_copy", "rescue",
           "structured", "weights_mask"]


def structured(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS):
    """``model``'s parameters selected by ``targets`` with its traced channel structures.

    Add ``"MultiheadAttention"`` to ``targets`` to prune attention heads too.
    """
    layout = select_parameters(model, targets)
    return layout.with_structures(StructureGraph.trace(model).structures(layout))


def masked_copy(model: nn.Module, layout, keep: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the structures ``keep`` drops zeroed (weights and gates)."""
    sid = layout.structure_index()
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], torch.ones_like(sid, dtype=bool))
    twin = copy.deepcopy(model)
    masks = MaskSet(layout, per_channel[layout.channel_index()])
    masks.with_extra(layout.structures.gate_masks(keep)).apply_(twin)
    return twin


def rescue(keep: torch.Tensor, layout) -> torch.Tensor:
    """At least one kept structure per group."""
    s = layout.structures
    for i in range(s.n_groups):
        if not keep[s.group_slice(i)].any():
            keep[s.group_slice(i).start] = True
    return keep


def gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the reference's scale (at least 1)."""
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def check(model: nn.Module, keep: torch.Tensor, x: torch.Tensor, rel: float = 1e-12,
          targets: Sequence[str] = DEFAULT_TARGETS):
    """masked == gated, and removed == masked with kept-channel LayerNorm statistics; returns
    (removed model, layout, difference of the plain masked model to the removed one)."""
    layout = structured(model, targets)
    keep = rescue(keep, layout)
    with torch.no_grad():
        masked = masked_copy(model, layout, keep)
        plain = masked(x)
        with layout.structures.gates(model, keep.double()):
            assert gap(model(x), plain) <= rel, "a zero gate differs from the masked structure"
        with kept_statistics(masked, layout.structures, keep):
            reference = masked(x)
        remove_structures(masked, layout.structures, keep)
        out = masked(x)
    assert out.shape == reference.shape
    assert gap(out, reference) <= rel, "the removed model differs from its reference"
    return masked, layout, gap(out, plain)


def weights_mask(keep: torch.Tensor, layout) -> torch.Tensor:
    """Weight keep-mask ``[d]`` from a structure keep-mask ``[S]`` (rows of id −1 kept)."""
    sid = layout.structure_index()
    per_channel = torch.where(sid >= 0, keep[sid.clamp_min(0)], torch.ones_like(sid, dtype=bool))
    return layout.expand_channels(per_channel)


_MASSES = (("count", torch.ones_like), ("l1", torch.abs), ("l2", torch.square))


def _mass(model: nn.Module, fn) -> float:
    return sum(float(fn(p.detach().double()).sum()) for p in model.parameters())


def assert_group_sums_match_removal(model: nn.Module, layout, keep_before: torch.Tensor,
                                    check: Sequence[int] | None = None) -> None:
    """Each structure's group sums (count, L1, squared L2) equal the drop of #θ, Σ|θ|, Σθ²
    when it alone is removed from ``model`` with ``keep_before`` applied.

    Structures already removed must sum to 0; a structure whose removal would empty its
    group is skipped (removal refuses it). ``check``: the structures to test (default all).
    """
    from curvprune.builtin.group_saliency import group_sums

    structures = layout.structures
    group = layout.structure_group()
    mask = weights_mask(keep_before, layout)
    weights = layout.gather(model)
    sums = {key: group_sums(model, layout, weights, mask, fn) for key, fn in _MASSES}
    base = copy.deepcopy(model)
    if not bool(keep_before.all()):
        remove_structures(base, structures, keep_before)
    before = {key: _mass(base, fn) for key, fn in _MASSES}
    for s in range(layout.n_structures) if check is None else check:
        if not bool(keep_before[s]):
            assert all(float(v[s]) == 0 for v in sums.values()), s
            continue
        gone = keep_before.clone()
        gone[s] = False
        if int(gone[group == group[s]].sum()) == 0:
            continue  # removal refuses to empty a group
        smaller = copy.deepcopy(model)
        remove_structures(smaller, structures, gone)
        for key, fn in _MASSES:
            drop = before[key] - _mass(smaller, fn)
            got = float(sums[key][s])
            assert abs(got - drop) <= 1e-9 * max(1.0, abs(drop)), (
                f"{key} of structure {s} ({structures.groups[int(group[s])].name}): group sum "
                f"{got!r}, removal drops {drop!r}"
            )
