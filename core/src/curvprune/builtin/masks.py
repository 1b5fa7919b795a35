"""Builtin plugin ``builtin.masks``: the mask appliers ``global``, ``layerwise``, ``nm``, ``channel``.

The selection rules they share (sparsity counts every unit, lowest scores first, ties by flat
index) are in :mod:`curvprune.builtin.selection`; ``channel`` lives in
:mod:`curvprune.builtin.channel`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from curvprune.builtin.channel import ChannelMask, ChannelMaskConfig
from curvprune.builtin.lowest import AcrossRanks, prune_lowest_in_runs
from curvprune.builtin.selection import (
    FLOOR_NUDGE,
    BuiltinMask,
    check_overrides,
    count_per_group,
    count_per_run,
    override_hits,
    prune_lowest,
    rank_alive_in_rows,
    round_count,
    selects,
    unit_interval,
)
from curvprune.errors import ConfigError
from curvprune.plugin.manager import hookimpl
from curvprune.plugin.registry import Register
from curvprune.tensors.layout import ParamLayout

__all__ = [
    "ChannelMask",
    "ChannelMaskConfig",
    "GlobalMask",
    "GlobalMaskConfig",
    "LayerwiseMask",
    "LayerwiseMaskConfig",
    "NMMask",
    "NMMaskConfig",
]


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

    max_layer_sparsity: float = attrs.field(default=1.0, converter=float, validator=unit_interval)
    min_keep: int = attrs.field(default=1, validator=attrs.validators.ge(0))


class GlobalMask(BuiltinMask):
    """One ranking over all selected weights: the lowest scores are removed, whatever their layer.

    This is the global magnitude/OBS selection of WoodFisher (Singh & Alistarh, 2020) and
    M-FAC (Frantar et al., 2021): with OBS saliencies in loss units, comparing weights across
    layers is meaningful. Per-layer limits (``max_layer_sparsity``, ``min_keep``) are exact: the
    mask removes the globally lowest among the weights each layer's remaining quota allows. When
    the limits make the target unreachable it removes all it may; :meth:`achieved_sparsity`
    reports what was reached.
    """

    name = "global"
    selects_columns = True

    def __init__(self, config: GlobalMaskConfig | None = None) -> None:
        super().__init__(config or GlobalMaskConfig())

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(sparsity · d)`` weights removed in all, within layer limits."""
        scores = self._check_select(scores, mask, sparsity, layout)
        self._check_finite(scores, mask, None, layout)
        # layers are contiguous runs: no sort, no int64 index per weight (builtin/lowest.py)
        return prune_lowest_in_runs(scores, mask, layout.sizes, *self._quotas(mask, sparsity, layout))

    def select_columns(
        self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout,
        columns: tuple[int, int],
    ) -> Tensor:
        """This rank's columns of :meth:`select`: the quotas from the whole mask (every rank
        holds it), the exact global k-th score by bisection with the counts summed over the
        ranks, ties to the lower positions (lower ranks first)."""
        scores = self._checked_columns(scores, mask, sparsity, layout, columns)
        lo, hi = columns
        return prune_lowest_in_runs(scores, mask[lo:hi], layout.sizes,
                                    *self._quotas(mask, sparsity, layout), columns=columns,
                                    ranks=AcrossRanks())

    def _quotas(self, mask: Tensor, sparsity: float, layout: ParamLayout) -> tuple[Tensor, Tensor]:
        """How many more weights each layer may lose, and how many go in all."""
        size = torch.tensor(layout.sizes, device=mask.device)
        removed = size - count_per_run(mask, layout.sizes)
        cap = self.config.max_layer_sparsity * FLOOR_NUDGE
        by_cap = torch.floor(size.double() * cap).long()
        limit = torch.minimum(by_cap, size - self.config.min_keep).clamp_min(0)
        quota = (limit - removed).clamp_min(0)
        total = (round(sparsity * layout.d) - removed.sum()).clamp_min(0)
        return quota, total


# --------------------------------------------------------------------------------------------
# layerwise
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class LayerwiseMaskConfig:
    """Options of the ``layerwise`` mask applier.

    Attributes:
        min_keep: weights every layer (every row, with ``scope = "row"``) keeps, >= 0.
        scope: ``layer``: the lowest scores of each layer go; ``row``: the same fraction of
            every output row goes, its lowest scores (WANDA's comparison group, Sun et al. 2024
            §3; for SparseGPT/OBC the same count per row).
        overrides: a sparsity for some layers instead of the step's level, by selector: an
            exact parameter name (``"fc.weight"``) or ``"re:<regex>"`` (full match on parameter
            names). The value holds at every step, whatever the schedule's level.
    """

    min_keep: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    overrides: dict[str, float] = attrs.field(
        factory=dict, converter=dict, validator=check_overrides, hash=False
    )
    scope: Literal["layer", "row"] = attrs.field(
        default="layer", validator=attrs.validators.in_(("layer", "row"))
    )


def output_rows(
    layout: ParamLayout, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The output row of every selected weight ``[d]``, each row's length and its layer.

    Rows are numbered across the layout in order. A weight ``[out, ...]`` (Linear, Conv) has
    ``out`` rows of its other dimensions; transformers' ``Conv1D`` (``[in, out]``) has ``out``
    rows, the columns; a 1-d parameter is one row.
    """
    parts, lengths, layers, first = [], [], [], 0
    for i, (shape, kind) in enumerate(zip(layout.shapes, layout.module_types, strict=True)):
        numel = math.prod(int(x) for x in shape)
        if kind == "Conv1D" and len(shape) == 2:
            n_rows = int(shape[1])
            rows = torch.arange(numel, device=device) % n_rows
        else:
            n_rows = int(shape[0]) if len(shape) > 1 else 1
            rows = torch.arange(numel, device=device) // (numel // n_rows)
        parts.append(rows + first)
        lengths.append(torch.full((n_rows,), numel // n_rows, dtype=torch.long, device=device))
        layers.append(torch.full((n_rows,), i, dtype=torch.long, device=device))
        first += n_rows
    return torch.cat(parts), torch.cat(lengths), torch.cat(layers)


class LayerwiseMask(BuiltinMask):
    """Every selected parameter pruned to the target separately (uniform per-layer sparsity).

    Layer l ends with ``min(round(s_l · n_l), n_l − min_keep)`` weights removed (or more, if
    more were removed before), where s_l is the step's level or the layer's override.
    """

    name = "layerwise"
    per_parameter = True

    def __init__(self, config: LayerwiseMaskConfig | None = None) -> None:
        super().__init__(config or LayerwiseMaskConfig())
        self.selects_columns = self.config.scope == "layer"

    def layer_sparsities(self, sparsity: float, layout: ParamLayout) -> list[float]:
        """Resolve each layer's sparsity: ``sparsity``, unless an override matches the layer.

        Raises:
            ConfigError: a selector matches no selected parameter, or two selectors match one.
        """
        out = [sparsity] * len(layout)
        claimed: dict[int, str] = {}
        for selector, value in self.config.overrides.items():
            if layout.partial and not any(selects(selector, n) for n in layout.names):
                continue  # a stage of a sequential step: the selector names another stage
            hits = override_hits(selector, layout, selects)
            for i in hits:
                if i in claimed:
                    raise ConfigError(
                        f"parameter {layout.names[i]!r} matches two overrides selectors, "
                        f"{claimed[i]!r} and {selector!r}; make them disjoint @ mask.overrides"
                    )
                claimed[i] = selector
                out[i] = float(value)
        return out

    def layer_counts(self, sparsity: float, layout: ParamLayout) -> list[int]:
        """How many weights each layer ends with removed at ``sparsity`` (before counting
        what is already removed): ``min(round(s_l · n_l), n_l − min_keep)``, at least 0."""
        size = torch.tensor(layout.sizes)
        level = torch.tensor(self.layer_sparsities(sparsity, layout), dtype=torch.float64)
        limit = torch.minimum(round_count(level, size), size - self.config.min_keep)
        return [int(c) for c in limit.clamp_min(0).tolist()]

    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """Keep-mask with ``round(s_l · n_l)`` weights removed in each layer l (or in each
        output row: ``round(s_l · row length)``, with ``scope = "row"``)."""
        scores = self._check_select(scores, mask, sparsity, layout)
        self._check_finite(scores, mask, None, layout)
        if self.config.scope == "row":
            row, length, row_layer = output_rows(layout, mask.device)
            level = torch.tensor(self.layer_sparsities(sparsity, layout), dtype=torch.float64,
                                 device=mask.device)
            limit = torch.minimum(round_count(level[row_layer], length),
                                  length - self.config.min_keep)
            removed = length - count_per_group(mask, row, length.numel())
            return prune_lowest(scores, mask, row, (limit - removed).clamp_min(0))
        return prune_lowest_in_runs(scores, mask, layout.sizes, self._quota(mask, sparsity, layout))

    def select_columns(
        self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout,
        columns: tuple[int, int],
    ) -> Tensor | None:
        """This rank's columns of :meth:`select` (``scope = "layer"``): each layer's k-th
        score by one bisection for all layers, the counts of a layer cut between two ranks
        summed over them. None with ``scope = "row"`` (the pipeline gathers the scores)."""
        if self.config.scope != "layer":
            return None
        scores = self._checked_columns(scores, mask, sparsity, layout, columns)
        lo, hi = columns
        return prune_lowest_in_runs(scores, mask[lo:hi], layout.sizes,
                                    self._quota(mask, sparsity, layout), columns=columns,
                                    ranks=AcrossRanks())

    def _quota(self, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """How many more weights each layer loses."""
        size = torch.tensor(layout.sizes, device=mask.device)
        removed = size - count_per_run(mask, layout.sizes)
        limit = torch.tensor(self.layer_counts(sparsity, layout), device=mask.device)
        return (limit - removed).clamp_min(0)



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


class NMMask(BuiltinMask):
    """N:M semi-structured sparsity along the input dimension (Mishra et al., 2021).

    Groups are M consecutive input weights: for a Linear weight ``[out, in]`` the runs
    ``w[o, kM:(k+1)M]``; for a Conv weight ``[out, in, kh, kw]`` the runs of M consecutive input
    channels ``w[o, kM:(k+1)M, i, j]`` at each kernel position; for transformers' ``Conv1D``
    (weight stored ``[in, out]``) the runs ``w[kM:(k+1)M, o]``, the same input-side groups as
    the equivalent Linear (what sparse tensor cores need). At level s every group has
    ``round(s·M)`` weights removed (its lowest-scored, counting those already removed), so the
    final level (M−N)/M gives exactly M−N removed per group; an intermediate level counts per
    group, not over all weights.
    """

    name = "nm"
    per_parameter = True

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
        for name, shape, offset, kind in zip(
            layout.names, layout.shapes, layout.offsets[:-1], layout.module_types, strict=True
        ):
            if kind == "Conv1D" and len(shape) == 2:  # transformers' [in, out] weight
                inp, out = int(shape[0]), int(shape[1])
                if inp % m:
                    raise ConfigError(
                        f"mask 'nm' ({self.config.n_m}) groups {m} consecutive input weights, "
                        f"but {name!r} (Conv1D, shape [in, out] = {list(shape)}) has input "
                        f"dimension {inp}, not divisible by {m}; exclude it with prune.ignore "
                        "@ mask.n_m"
                    )
                flat = torch.arange(offset, offset + inp * out, device=device)
                # [in/M, M, out] -> [in/M, out, M]: each row is M consecutive inputs of an output.
                parts.append(flat.view(inp // m, m, out).transpose(1, 2).reshape(-1, m))
                continue
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


@hookimpl
def curvprune_register_mask_appliers(register: Register) -> None:
    """Register ``global``, ``layerwise``, ``nm`` and ``channel``."""
    register("global", GlobalMask, config=GlobalMaskConfig)
    register("layerwise", LayerwiseMask, config=LayerwiseMaskConfig)
    register("nm", NMMask, config=NMMaskConfig)
    register("channel", ChannelMask, config=ChannelMaskConfig)
