"""Builtin mask appliers: ``global``, ``layerwise``, ``nm`` (N:M) and ``channel``.

All four turn saliencies into a keep-mask with the same rules:

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
(:func:`rank_alive_in_rows`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from curvprune.errors import ConfigError, NumericalError, closest
from curvprune.interfaces import Granularity, MaskApplier
from curvprune.layout import ParamLayout
from curvprune.plugins import hookimpl
from curvprune.registry import Register

__all__ = [
    "ChannelMask",
    "ChannelMaskConfig",
    "GlobalMask",
    "GlobalMaskConfig",
    "LayerwiseMask",
    "LayerwiseMaskConfig",
    "NMMask",
    "NMMaskConfig",
    "prune_lowest",
    "rank_alive_in_rows",
    "rank_within_groups",
]

# A cap such as floor(0.3·n) must count as if 0.3 were exact, although the float 0.3 lies 2⁻⁵⁴
# (relative) below 3/10 and the product rounds by up to another 2⁻⁵³: a relative nudge of 2⁻⁵⁰
# covers both, while a cap written with a few decimals never lands that close below an integer
# (for any n up to ~10¹²), so the nudge never crosses a genuine one.
_FLOOR_NUDGE = 1.0 + 2.0**-50


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


def _count_per_group(values: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Sum of integer ``values`` ``[n]`` in each group, long ``[n_groups]`` (no host sync)."""
    out = torch.zeros(n_groups, dtype=torch.long, device=values.device)
    return out.index_add_(0, group, values.long())


def _round_count(fraction: Tensor | float, size: Tensor) -> Tensor:
    """``round(fraction · size)`` in float64 (round half to even, like Python's ``round``)."""
    return torch.round(torch.as_tensor(fraction, dtype=torch.float64) * size.double()).long()


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------
def _check_sparsity(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {value}")


def _unit_interval(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value}")


class _BuiltinMask(MaskApplier):
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

    def _check_finite(
        self, scores: Tensor, alive: Tensor, owner: Tensor, layout: ParamLayout
    ) -> None:
        """Raise on NaN scores of alive units (one host sync, outside any loop)."""
        bad = torch.isnan(scores) & alive
        if bool(bad.any()):
            first = int(owner[bad.nonzero()[0, 0]])
            unit = "weights" if self.granularity == "weight" else "channels"
            where = layout.names[first]
            if self.granularity == "channel" and layout.structures is not None:
                where = layout.structures.groups[first].name
            raise NumericalError(
                f"mask {self.name!r}: scores are NaN for {int(bad.sum())} kept {unit} (first in "
                f"{where!r}); the scorer produced NaN"
            )


# --------------------------------------------------------------------------------------------
# global
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class GlobalMaskConfig:
    """Options of the ``global`` mask applier.

    Attributes:
        max_layer_sparsity: no layer ends sparser than this fraction (removed weights ≤
            ``floor(max_layer_sparsity · n_layer)``), in (0, 1].
        min_keep: weights every layer keeps, >= 0.
    """

    max_layer_sparsity: float = attrs.field(default=1.0, converter=float, validator=_unit_interval)
    min_keep: int = attrs.field(default=1, validator=attrs.validators.ge(0))


class GlobalMask(_BuiltinMask):
    """One ranking over all selected weights: the lowest scores are removed, whatever their layer.

    This is the global magnitude/OBS selection of WoodFisher (Singh & Alistarh, 2020) and
    M-FAC (Frantar et al., 2021): with OBS saliencies in loss units, comparing weights across
    layers is meaningful. Per-layer limits (``max_layer_sparsity``, ``min_keep``) are exact: the
    mask removes the globally lowest among the weights each layer's remaining quota allows. When
    the limits make the target unreachable it removes all it may; :meth:`achieved_sparsity`
    reports what was reached.
    """

    name = "global"

    def __init__(self, config: GlobalMaskConfig | None = None) -> None:
        super().__init__(config or GlobalMaskConfig())

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(sparsity · d)`` weights removed in all, within layer limits."""
        scores = self._check_select(scores, mask, sparsity, layout)
        layer = layout.param_index(mask.device)
        self._check_finite(scores, mask, layer, layout)
        size = torch.tensor(layout.sizes, device=mask.device)
        removed = size - _count_per_group(mask, layer, len(layout))
        cap = self.config.max_layer_sparsity * _FLOOR_NUDGE
        by_cap = torch.floor(size.double() * cap).long()
        limit = torch.minimum(by_cap, size - self.config.min_keep).clamp_min(0)
        quota = (limit - removed).clamp_min(0)
        total = (round(sparsity * layout.d) - removed.sum()).clamp_min(0)
        return prune_lowest(scores, mask, layer, quota, total)


# --------------------------------------------------------------------------------------------
# layerwise
# --------------------------------------------------------------------------------------------
def _check_overrides(_: Any, attribute: attrs.Attribute, value: Mapping[str, float]) -> None:
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


@attrs.frozen(kw_only=True)
class LayerwiseMaskConfig:
    """Options of the ``layerwise`` mask applier.

    Attributes:
        min_keep: weights every layer keeps, >= 0.
        overrides: a sparsity for some layers instead of the step's level, by selector: an
            exact parameter name (``"fc.weight"``) or ``"re:<regex>"`` (full match on parameter
            names). The value holds at every step, whatever the schedule's level.
    """

    min_keep: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    overrides: dict[str, float] = attrs.field(
        factory=dict, converter=dict, validator=_check_overrides, hash=False
    )


class LayerwiseMask(_BuiltinMask):
    """Every selected parameter pruned to the target separately (uniform per-layer sparsity).

    Layer l ends with ``min(round(s_l · n_l), n_l − min_keep)`` weights removed (or more, if
    more were removed before), where s_l is the step's level or the layer's override.
    """

    name = "layerwise"

    def __init__(self, config: LayerwiseMaskConfig | None = None) -> None:
        super().__init__(config or LayerwiseMaskConfig())

    def layer_sparsities(self, sparsity: float, layout: ParamLayout) -> list[float]:
        """Resolve each layer's sparsity: ``sparsity``, unless an override matches the layer.

        Raises:
            ConfigError: a selector matches no selected parameter, or two selectors match one.
        """
        out = [sparsity] * len(layout)
        claimed: dict[int, str] = {}
        for selector, value in self.config.overrides.items():
            hits = _override_hits(selector, layout, _selects)
            for i in hits:
                if i in claimed:
                    raise ConfigError(
                        f"parameter {layout.names[i]!r} matches two overrides selectors, "
                        f"{claimed[i]!r} and {selector!r}; make them disjoint @ mask.overrides"
                    )
                claimed[i] = selector
                out[i] = float(value)
        return out

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(s_l · n_l)`` weights removed in each layer l."""
        scores = self._check_select(scores, mask, sparsity, layout)
        layer = layout.param_index(mask.device)
        self._check_finite(scores, mask, layer, layout)
        size = torch.tensor(layout.sizes, device=mask.device)
        removed = size - _count_per_group(mask, layer, len(layout))
        level = torch.tensor(
            self.layer_sparsities(sparsity, layout), dtype=torch.float64, device=mask.device
        )
        limit = torch.minimum(_round_count(level, size), size - self.config.min_keep)
        quota = (limit - removed).clamp_min(0)
        return prune_lowest(scores, mask, layer, quota)


def _selects(selector: str, name: str) -> bool:
    """Whether an overrides selector picks parameter ``name``."""
    if selector.startswith("re:"):
        return re.fullmatch(selector[3:], name) is not None
    return selector == name


def _override_hits(
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


# --------------------------------------------------------------------------------------------
# nm
# --------------------------------------------------------------------------------------------
_N_M = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def _parse_n_m(text: str) -> tuple[int, int] | None:
    match = _N_M.fullmatch(text)
    if match is None:
        return None
    n, m = int(match.group(1)), int(match.group(2))
    return (n, m) if 0 < n < m else None


def _check_n_m(_: Any, attribute: attrs.Attribute, value: str) -> None:
    if _parse_n_m(value) is None:
        raise ValueError(
            f"{attribute.name} must be 'N:M' with 0 < N < M (e.g. '2:4'), got {value!r}"
        )


@attrs.frozen(kw_only=True)
class NMMaskConfig:
    """Options of the ``nm`` mask applier.

    Attributes:
        n_m: ``"N:M"``: N of every M consecutive input weights are kept, 0 < N < M.
    """

    n_m: str = attrs.field(default="2:4", validator=_check_n_m)

    @property
    def n(self) -> int:
        """N, the weights kept per group."""
        return _parse_n_m(self.n_m)[0]  # type: ignore[index]

    @property
    def m(self) -> int:
        """M, the group length."""
        return _parse_n_m(self.n_m)[1]  # type: ignore[index]


class NMMask(_BuiltinMask):
    """N:M semi-structured sparsity along the input dimension (Mishra et al., 2021).

    Groups are M consecutive input weights: for a Linear weight ``[out, in]`` the runs
    ``w[o, kM:(k+1)M]``; for a Conv weight ``[out, in, kh, kw]`` the runs of M consecutive input
    channels ``w[o, kM:(k+1)M, i, j]`` at each kernel position. At level s every group has
    ``round(s·M)`` weights removed (its lowest-scored, counting those already removed), so the
    final level (M−N)/M gives exactly M−N removed per group; an intermediate level counts per
    group, not over all weights.
    """

    name = "nm"

    def __init__(self, config: NMMaskConfig | None = None) -> None:
        super().__init__(config or NMMaskConfig())

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Also require ``prune.sparsity`` = (M−N)/M."""
        reason = None
        prune = components.get("prune")
        if prune is not None:
            n, m = self.config.n, self.config.m
            exact = (m - n) / m
            if not math.isclose(prune.sparsity, exact, rel_tol=0.0, abs_tol=1e-9):
                reason = (
                    f"mask 'nm' with n_m = '{n}:{m}' removes exactly {m - n} of every {m} "
                    f"weights; set prune.sparsity = {exact:g} (got {prune.sparsity:g}) "
                    "@ prune.sparsity"
                )
        return reason

    def groups(self, layout: ParamLayout, device: torch.device | str | None = None) -> Tensor:
        """Flat indices of every N:M group, long ``[n_groups, M]``, in layout order.

        Raises:
            ConfigError: a parameter has no input dimension or one not divisible by M.
        """
        m = self.config.m
        parts = []
        for name, shape, offset in zip(
            layout.names, layout.shapes, layout.offsets[:-1], strict=True
        ):
            if len(shape) < 2 or shape[1] % m:
                why = (
                    "has no input dimension"
                    if len(shape) < 2
                    else f"has input dimension {shape[1]}, not divisible by {m}"
                )
                raise ConfigError(
                    f"mask 'nm' ({self.config.n_m}) groups {m} consecutive input weights, but "
                    f"{name!r} (shape {list(shape)}) {why}; exclude it with prune.ignore "
                    "@ mask.n_m"
                )
            out, inp = int(shape[0]), int(shape[1])
            rest = math.prod(int(s) for s in shape[2:])
            flat = torch.arange(offset, offset + out * inp * rest, device=device)
            # [out, in/M, M, rest] -> [out, in/M, rest, M]: each row is one group.
            parts.append(flat.view(out, inp // m, m, rest).transpose(2, 3).reshape(-1, m))
        return torch.cat(parts)

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(sparsity · M)`` weights removed in every group."""
        scores = self._check_select(scores, mask, sparsity, layout)
        n, m = self.config.n, self.config.m
        per_group = round(sparsity * m)
        if per_group > m - n:
            raise ValueError(
                f"mask 'nm' ({n}:{m}) removes at most {m - n} of every {m} weights (sparsity "
                f"{(m - n) / m:g}), got sparsity {sparsity:g}"
            )
        self._check_finite(scores, mask, layout.param_index(mask.device), layout)
        groups = self.groups(layout, mask.device)
        alive = mask[groups]
        quota = (per_group - (m - alive.sum(1))).clamp_min(0)
        keep = alive & (rank_alive_in_rows(scores[groups], alive) >= quota[:, None])
        out = mask.clone()
        out[groups.reshape(-1)] = keep.reshape(-1)
        return out


# --------------------------------------------------------------------------------------------
# channel
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class ChannelMaskConfig:
    """Options of the ``channel`` mask applier.

    Attributes:
        scope: ``global`` (one ranking over the structures of all groups) or ``layerwise``
            (every group loses the same fraction of its structures).
        min_channels: structures every group keeps, >= 0.
        coupled: trace the model (:class:`curvprune.StructureGraph`) so that coupled channels
            (residual streams) form one structure and the classifier is never pruned; false:
            every output channel of every selected parameter is its own structure, no tracing
            (physical removal is then impossible).
        remove: after pruning, ``curvprune run`` removes the pruned channels physically (a
            smaller model) before fine-tuning; ``Pipeline.prune`` itself only masks.
        overrides: with ``scope = "layerwise"``, a fraction of channels to remove for some
            groups instead of the step's level, by selector: a module name (``"features.3"``),
            a parameter name (``"features.3.weight"``) or ``"re:<regex>"`` (full match on
            parameter names); a selector matching any producer of a group sets that group.
    """

    scope: Literal["global", "layerwise"] = attrs.field(
        default="global", validator=attrs.validators.in_(("global", "layerwise"))
    )
    min_channels: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    coupled: bool = True
    remove: bool = False
    overrides: dict[str, float] = attrs.field(
        factory=dict, converter=dict, validator=_check_overrides, hash=False
    )

    def __attrs_post_init__(self) -> None:
        if self.overrides and self.scope != "layerwise":
            raise ValueError("overrides need scope = 'layerwise'")


class ChannelMask(_BuiltinMask):
    """Structured pruning of whole channel structures (filters of Conv, rows of Linear).

    Scores are one per **structure** (``[S]``, :attr:`ParamLayout.n_structures`): with
    structures traced (``coupled = true``, set up by the pipeline) a structure is one channel of
    a prunable group, coupled channels of a residual stream included, and channels outside any
    prunable group (the classifier's rows) are never pruned; without, each output channel of
    each selected parameter is one structure. A structure counts as removed when none of its
    weights is kept. Sparsity, and :meth:`achieved_sparsity`, are in structure units: the
    fraction of all structures removed. The returned weight mask zeroes every weight row of a
    removed structure; the pipeline also zeroes its biases and BatchNorm γ, β
    (:meth:`curvprune.MaskSet.with_extra`), so the structure's output is exactly zero.
    """

    name = "channel"
    granularity: Granularity = "channel"

    def __init__(self, config: ChannelMaskConfig | None = None) -> None:
        super().__init__(config or ChannelMaskConfig())

    @property
    def traces(self) -> bool:
        """Whether the pipeline should attach traced structures to the layout."""
        return bool(self.config.coupled)

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Physical removal needs traced structures."""
        if self.config.remove and not self.config.coupled:
            return (
                "mask 'channel' with remove = true needs coupled = true (removal slices the "
                "traced channel groups) @ mask.remove"
            )
        return None

    @staticmethod
    def alive_channels(mask: Tensor, layout: ParamLayout) -> Tensor:
        """Mark the output channels that still have a kept weight: bool ``[n_channels]``."""
        return layout.alive_channels(mask)

    @staticmethod
    def alive_structures(mask: Tensor, layout: ParamLayout) -> Tensor:
        """Mark the structures that still have a kept weight: bool ``[S]``."""
        return layout.alive_structures(mask)

    def group_fractions(self, sparsity: float, layout: ParamLayout) -> list[float]:
        """Resolve each structure group's fraction: ``sparsity`` unless an override matches.

        Raises:
            ConfigError: a selector matches no selected parameter, matches only parameters that
                are not prunable, or two selectors match one group.
        """
        n_groups = layout.n_structure_groups
        out = [sparsity] * n_groups
        if not self.config.overrides:
            return out
        # group of each selected parameter (-1: none), from its first channel's structure
        first = [0]
        for c in layout.channels[:-1]:
            first.append(first[-1] + c)
        sid = layout.structure_index()
        sgroup = layout.structure_group()
        group_of = [int(sgroup[sid[f]]) if int(sid[f]) >= 0 else -1 for f in first]
        claimed: dict[int, str] = {}
        for selector, value in self.config.overrides.items():
            hits = _override_hits(selector, layout, _selects_param)
            groups = {group_of[i] for i in hits if group_of[i] >= 0}
            if not groups:
                raise ConfigError(
                    f"overrides selector {selector!r} matches only parameters whose channels "
                    f"cannot be pruned ({', '.join(layout.names[i] for i in hits)}) "
                    "@ mask.overrides"
                )
            for g in groups:
                if g in claimed and claimed[g] != selector:
                    raise ConfigError(
                        f"channel group {g} matches two overrides selectors, {claimed[g]!r} and "
                        f"{selector!r}; make them disjoint @ mask.overrides"
                    )
                claimed[g] = selector
                out[g] = float(value)
        return out

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(sparsity · S)`` whole structures removed."""
        scores = self._check_select(scores, mask, sparsity, layout)
        group = layout.structure_group(mask.device)
        n_groups = layout.n_structure_groups
        alive = layout.alive_structures(mask)
        self._check_finite(scores, alive, group, layout)
        size = torch.bincount(group, minlength=n_groups)
        kept = _count_per_group(alive, group, n_groups)
        removed = size - kept
        total: Tensor | None = None
        if self.config.scope == "global":
            quota = (kept - self.config.min_channels).clamp_min(0)
            total = (round(sparsity * layout.n_structures) - removed.sum()).clamp_min(0)
        else:
            level = torch.tensor(
                self.group_fractions(sparsity, layout), dtype=torch.float64, device=mask.device
            )
            limit = torch.minimum(_round_count(level, size), size - self.config.min_channels)
            quota = (limit - removed).clamp_min(0)
        alive = prune_lowest(scores, alive, group, quota, total)
        sid = layout.structure_index(mask.device)
        never = torch.ones_like(sid, dtype=torch.bool)  # channels outside prunable groups
        keep_channel = torch.where(sid >= 0, alive[sid.clamp_min(0)], never)
        return mask & layout.expand_channels(keep_channel)

    def achieved_sparsity(self, mask: Tensor, layout: ParamLayout) -> float:
        """Fraction of structures with no kept weight."""
        if layout.n_structures == 0:
            return 0.0
        return float(1.0 - layout.alive_structures(mask).double().mean())


def _selects_param(selector: str, name: str) -> bool:
    """An overrides selector of the channel mask: parameter name, module name or ``re:``."""
    return _selects(selector, name) or (
        not selector.startswith("re:") and name.rsplit(".", 1)[0] == selector
    )


@hookimpl
def curvprune_register_mask_appliers(register: Register) -> None:
    """Register ``global``, ``layerwise``, ``nm`` and ``channel``."""
    register("global", GlobalMask, config=GlobalMaskConfig)
    register("layerwise", LayerwiseMask, config=LayerwiseMaskConfig)
    register("nm", NMMask, config=NMMaskConfig)
    register("channel", ChannelMask, config=ChannelMaskConfig)
