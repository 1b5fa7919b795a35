"""The builtin ``channel`` mask applier: whole output channels (coupled structures) at a time."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import torch
from torch import Tensor

from curvprune.builtin.selection import (
    BuiltinMask,
    check_overrides,
    count_per_group,
    override_hits,
    prune_lowest,
    round_count,
    selects,
)
from curvprune.errors import ChannelCollapseWarning, ConfigError
from curvprune.roles.units import Granularity
from curvprune.tensors.layout import ParamLayout

__all__ = ["ChannelMask", "ChannelMaskConfig"]


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
        strict: a selected layer whose channels cannot be pruned (its group is not removable,
            e.g. it feeds a ``torch.cat``) is an error instead of a warning.
    """

    scope: Literal["global", "layerwise"] = attrs.field(
        default="global", validator=attrs.validators.in_(("global", "layerwise"))
    )
    min_channels: int = attrs.field(default=1, validator=attrs.validators.ge(0))
    coupled: bool = True
    remove: bool = False
    overrides: dict[str, float] = attrs.field(
        factory=dict, converter=dict, validator=check_overrides, hash=False
    )
    strict: bool = False

    def __attrs_post_init__(self) -> None:
        if self.overrides and self.scope != "layerwise":
            raise ValueError("overrides need scope = 'layerwise'")


class ChannelMask(BuiltinMask):
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
            hits = override_hits(selector, layout, _selects_param)
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
        kept = count_per_group(alive, group, n_groups)
        removed = size - kept
        total: Tensor | None = None
        if self.config.scope == "global":
            quota = (kept - self.config.min_channels).clamp_min(0)
            total = (round(sparsity * layout.n_structures) - removed.sum()).clamp_min(0)
        else:
            level = torch.tensor(
                self.group_fractions(sparsity, layout), dtype=torch.float64, device=mask.device
            )
            limit = torch.minimum(round_count(level, size), size - self.config.min_channels)
            quota = (limit - removed).clamp_min(0)
        alive = prune_lowest(scores, alive, group, quota, total)
        if total is not None:
            self._warn_collapse(count_per_group(alive, group, n_groups), size, sparsity)
        sid = layout.structure_index(mask.device)
        never = torch.ones_like(sid, dtype=torch.bool)  # channels outside prunable groups
        keep_channel = torch.where(sid >= 0, alive[sid.clamp_min(0)], never)
        return mask & layout.expand_channels(keep_channel)

    @staticmethod
    def _warn_collapse(kept: Tensor, size: Tensor, sparsity: float) -> None:
        """Warn when a global ranking leaves a group 10 % or less of its channels.

        Scores of different layers need not be comparable (a magnitude norm grows with the
        fan-in), so one global ranking can empty a layer while the target is modest.
        """
        collapsed = (kept * 10 <= size) & (size > 1)
        if bool(collapsed.any()):  # one host sync per pruning step
            worst = int((kept.double() / size.clamp_min(1)).argmin())
            warnings.warn(
                f"the global channel ranking at {100 * sparsity:.0f} % keeps 10 % or less of "
                f"{int(collapsed.sum())} group(s) (group {worst}: {int(kept[worst])} of "
                f"{int(size[worst])}); use scope = 'layerwise', raise min_channels or a scorer "
                "whose scores compare across layers",
                ChannelCollapseWarning,
                stacklevel=4,
            )

    def achieved_sparsity(self, mask: Tensor, layout: ParamLayout) -> float:
        """Fraction of structures with no kept weight."""
        if layout.n_structures == 0:
            return 0.0
        return float(1.0 - layout.alive_structures(mask).double().mean())


def _selects_param(selector: str, name: str) -> bool:
    """An overrides selector of the channel mask: parameter name, module name or ``re:``."""
    return selects(selector, name) or (
        not selector.startswith("re:") and name.rsplit(".", 1)[0] == selector
    )

