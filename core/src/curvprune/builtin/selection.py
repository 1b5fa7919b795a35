"""What every builtin mask applier shares: selection primitives, the base class, overrides.

The four builtin mask appliers (``global``, ``layerwise``, ``nm``, ``channel``) turn saliencies into a keep-mask with the same rules:

* **Sparsity counts every selected unit**, those removed at earlier steps included: pruning to
  sparsity s over n units leaves exactly ``round(s·n)`` of them removed (unless a per-layer
  limit forbids it, or more were removed already: a mask applier never revives a unit, so the
  new keep-mask is always a subset of the current one).
* **The lowest scores go first.** Scores of units already removed are never read.
* **Ties break by flat index** (the lower index is pruned first), through stable sorts only, so
  the same scores always give the same mask on every device.

Layer and channel selection reduce to one primitive, :func:`prune_lowest`: given the units
still alive, a group id per unit (its layer) and a per-group quota of further removals, remove
the lowest-scored units, either exactly the quota in every group or the globally lowest ``total``
among the units the quotas allow. Ranks within groups come from two stable sorts (by score,
then by group), so the work is two sorts over the alive units whatever the number of layers.
N:M groups, short rows of equal length, are ranked row by row instead
(:func:`rank_alive_in_rows`). The ``global`` and ``layerwise`` masks, whose groups are the
layers' contiguous runs of weights, use :func:`curvprune.builtin.lowest.prune_lowest_in_runs`
instead: the same selection without sorting (9 bytes per score instead of ~56 of int64
permutations, which at d = 85 M is the difference between 0.8 and 4.8 GB).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import attrs
import torch
from torch import Tensor

from curvprune.errors import ConfigError, NumericalError, closest
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.units import Granularity
from curvprune.tensors import distributed
from curvprune.tensors.layout import ParamLayout

__all__ = [
    "FLOOR_NUDGE",
    "BuiltinMask",
    "check_overrides",
    "count_per_group",
    "count_per_run",
    "override_hits",
    "prune_lowest",
    "rank_alive_in_rows",
    "rank_within_groups",
    "round_count",
    "selects",
    "unit_interval",
]

# A cap such as floor(0.3·n) must count as if 0.3 were exact, although the float 0.3 lies 2⁻⁵⁴
# (relative) below 3/10 and the product rounds by up to another 2⁻⁵³: a relative nudge of 2⁻⁵⁰
# covers both, while a cap written with a few decimals never lands that close below an integer
# (for any n up to ~10¹²), so the nudge never crosses a genuine one.
FLOOR_NUDGE = 1.0 + 2.0**-50


# --------------------------------------------------------------------------------------------
# The selection primitive
# --------------------------------------------------------------------------------------------
def rank_within_groups(scores: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Rank each unit by score within its group (0 = lowest score).

    Ties rank by position: a stable sort by score, then a stable sort by group, leaves every
    group's units contiguous, ordered by score and, among equal scores, by position.

    Args:
        scores: ``[n]`` scores.
        group: long ``[n]``, group id of each unit, in ``[0, n_groups)``.
        n_groups: number of groups.

    Returns:
        long ``[n]``: rank of each unit among the units of its group.
    """
    return _ranks_from_order(torch.sort(scores, stable=True).indices, group, n_groups)


def _ranks_from_order(by_score: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Ranks within groups, given the stable score order ``by_score`` of all units."""
    order = by_score[torch.sort(group[by_score], stable=True).indices]
    counts = torch.bincount(group, minlength=n_groups)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - first[group[order]]
    return rank


def prune_lowest(
    scores: Tensor, alive: Tensor, group: Tensor, quota: Tensor, total: Tensor | None = None
) -> Tensor:
    """Remove the lowest-scored alive units, at most ``quota[g]`` more in group g.

    Args:
        scores: ``[n]`` saliencies; only alive entries are read.
        alive: bool ``[n]``, the units not removed yet.
        group: long ``[n]``, group id of each unit, in ``[0, len(quota))``.
        quota: long ``[n_groups]`` >= 0, how many more units each group may lose.
        total: long 0-dim, how many units to remove in all: the globally lowest among the units
            the quotas allow (a unit is allowed if its rank among its group's alive units is
            below the group's quota). None: remove exactly ``quota[g]`` units (or all alive ones,
            if fewer) from every group.

    Returns:
        bool ``[n]``, the new alive units: a subset of ``alive``.
    """
    index = alive.nonzero().squeeze(1)
    values, owner = scores[index], group[index]
    by_score = torch.sort(values, stable=True).indices
    chosen = _ranks_from_order(by_score, owner, quota.numel()) < quota[owner]
    if total is not None:
        allowed = by_score[chosen[by_score]]  # the allowed units, lowest score first
        first_total = torch.arange(allowed.numel(), device=allowed.device) < total
        chosen = torch.zeros_like(chosen)
        chosen[allowed[first_total]] = True
    out = alive.clone()
    out[index[chosen]] = False
    return out


def rank_alive_in_rows(scores: Tensor, alive: Tensor) -> Tensor:
    """Rank each entry by score among the alive entries of its row (ties: lower column first).

    Small fixed-length groups (N:M) sort faster as rows of a matrix than through
    :func:`rank_within_groups`: a stable row sort by score, then a stable row sort that moves
    the dead entries behind the alive ones.

    Args:
        scores: ``[rows, k]`` scores.
        alive: bool ``[rows, k]``.

    Returns:
        long ``[rows, k]``: an alive entry's rank among its row's alive entries; dead entries
        rank after all of them.
    """
    order = torch.sort(scores, dim=1, stable=True).indices
    dead = (~alive).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(dead, dim=1, stable=True).indices)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def count_per_run(values: Tensor, sizes: Sequence[int]) -> Tensor:
    """Nonzero ``values`` ``[n]`` in each contiguous run of ``sizes``, long ``[len(sizes)]``."""
    return torch.stack([torch.count_nonzero(run) for run in values.split(list(sizes))])


def count_per_group(values: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Sum of integer ``values`` ``[n]`` in each group, long ``[n_groups]`` (no host sync)."""
    out = torch.zeros(n_groups, dtype=torch.long, device=values.device)
    return out.index_add_(0, group, values.long())


def round_count(fraction: Tensor | float, size: Tensor) -> Tensor:
    """``round(fraction · size)`` in float64 (round half to even, like Python's ``round``)."""
    return torch.round(torch.as_tensor(fraction, dtype=torch.float64) * size.double()).long()


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------
def _check_sparsity(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value}")


def unit_interval(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


class BuiltinMask(MaskApplier):
    """What the builtin appliers share: argument checks.

    The scorer/applier granularity match is checked once, by the pipeline, for every applier.
    """

    name: ClassVar[str]
    granularity: Granularity = "weight"

    def _check_select(
        self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout
    ) -> Tensor:
        """Validate :meth:`select`'s arguments; return ``scores`` on the mask's device."""
        if mask.dtype != torch.bool or tuple(mask.shape) != (layout.d,):
            raise ValueError(
                f"mask {self.name!r}: the keep-mask must be bool [{layout.d}], got "
                f"{mask.dtype} {list(mask.shape)}"
            )
        units = layout.d if self.granularity == "weight" else layout.n_structures
        if tuple(scores.shape) != (units,):
            what = "weight" if self.granularity == "weight" else "channel structure"
            raise ValueError(
                f"mask {self.name!r} needs one score per {what} ([{units}]), got scores of "
                f"shape {list(scores.shape)}"
            )
        _check_sparsity(sparsity)
        return scores.to(mask.device)

    def _checked_columns(
        self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout,
        columns: tuple[int, int],
    ) -> Tensor:
        """:meth:`_check_select` and :meth:`_check_finite` for scores split over the ranks
        (:meth:`select_columns`): the NaN check agrees over the ranks (one all-reduce of the
        first bad position), so that every rank raises the same error, naming the layer."""
        lo, hi = columns
        if tuple(scores.shape) != (hi - lo,) or mask.shape != (layout.d,):
            raise ValueError(
                f"mask {self.name!r}: columns [{lo}, {hi}) need {hi - lo} scores and the whole "
                f"bool [{layout.d}] keep-mask, got {list(scores.shape)} and {list(mask.shape)}"
            )
        _check_sparsity(sparsity)
        scores = scores.to(mask.device)
        bad = torch.isnan(scores) & mask[lo:hi]
        local = bad.nonzero()[:1, 0] + lo if bad.numel() else bad.new_zeros(0, dtype=torch.long)
        first = torch.full((1,), layout.d, dtype=torch.long, device=mask.device)
        first[: local.numel()] = local
        first = int(distributed.all_reduce_(first, "min"))
        if first < layout.d:
            where = layout.names[int(torch.searchsorted(torch.tensor(layout.offsets[1:]), first,
                                                        right=True))]
            raise NumericalError(
                f"mask {self.name!r}: scores are NaN for kept weights (first in {where!r}); "
                "the scorer produced NaN"
            )
        return scores

    def _check_finite(
        self, scores: Tensor, alive: Tensor, owner: Tensor | None, layout: ParamLayout
    ) -> None:
        """Raise on NaN scores of alive units (one host sync, outside any loop).

        ``owner``: each unit's layer (or group); None: the weights' layers, looked up only
        when there is an error to name.
        """
        bad = torch.isnan(scores) & alive
        if bool(bad.any()):
            position = int(bad.nonzero()[0, 0])
            if owner is None:
                first = int(torch.searchsorted(torch.tensor(layout.offsets[1:]), position,
                                               right=True))
            else:
                first = int(owner[position])
            unit = "weights" if self.granularity == "weight" else "channels"
            where = layout.names[first]
            if self.granularity == "channel" and layout.structures is not None:
                where = layout.structures.groups[first].name
            raise NumericalError(
                f"mask {self.name!r}: scores are NaN for {int(bad.sum())} kept {unit} (first in "
                f"{where!r}); the scorer produced NaN"
            )



def check_overrides(_: Any, attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
    for selector, sparsity in value.items():
        if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(
                f"{attribute.name} must map selectors to sparsities in [0, 1), got "
                f"{selector!r} = {sparsity!r}"
            )
        if selector.startswith("re:"):
            try:
                re.compile(selector[3:])
            except re.error as exc:
                raise ValueError(
                    f"{attribute.name} must use valid 're:' regexes, got {selector!r} ({exc})"
                ) from None




def selects(selector: str, name: str) -> bool:
    """Whether an overrides selector picks parameter ``name``."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    return selector == name


def override_hits(
    selector: str, layout: ParamLayout, selects: Callable[[str, str], bool]
) -> list[int]:
    """Indices of the parameters an overrides selector picks; raises if it picks none."""
    hits = [i for i, name in enumerate(layout.names) if selects(selector, name)]
    if not hits:
        hint = closest(selector, layout.names)
        more = f"; did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"overrides selector {selector!r} matches no pruned parameter (pruned: "
            f"{', '.join(layout.names)}){more} @ mask.overrides"
        )
    return hits


