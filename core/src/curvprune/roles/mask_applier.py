"""The mask-applier role: scores and a target sparsity in, a keep-mask out."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from curvprune.roles.units import Granularity
from curvprune.tensors.layout import ParamLayout

if TYPE_CHECKING:
    pass

__all__ = ["MaskApplier"]


class MaskApplier(abc.ABC):
    """Turns saliencies and a target sparsity into a keep-mask over the selected weights.

    A mask applier never revives a pruned weight: the new mask is a subset of the current one.
    """

    granularity: Granularity = "weight"

    #: True when each parameter's new mask depends only on that parameter's scores and mask
    #: (``layerwise``, ``nm``), so a step may be run on one stage of parameters at a time
    #: (sequential calibration); False for rankings across parameters (``global``).
    per_parameter: ClassVar[bool] = False

    #: True when :meth:`select_columns` can select over scores split by columns over the
    #: torch.distributed ranks (an instance attribute: an option may decide it).
    selects_columns: bool = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    @abc.abstractmethod
    def select(self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout) -> Tensor:
        """The new keep-mask.

        Args:
            scores: saliencies ``[d]`` (weight granularity) or ``[S]`` (channel granularity:
                one per structure, see :attr:`ParamLayout.n_structures`).
            mask: the current keep-mask, bool ``[d]``.
            sparsity: the target fraction of removed units, in [0, 1): of all selected weights
                (weight granularity) or of all structures (channel granularity), counting the
                units already removed.
            layout: the selected parameters.

        Returns:
            bool ``[d]``, True where a weight is kept; a subset of ``mask``.
        """

    def select_columns(
        self, scores: Tensor, mask: Tensor, sparsity: float, layout: ParamLayout,
        columns: tuple[int, int],
    ) -> Tensor | None:
        """:meth:`select` with the scores split over the torch.distributed ranks, or None.

        Each rank holds the scores of its contiguous columns ``[lo, hi)`` of the flat layout
        (rank order = column order) and every rank calls this alike; the result, this rank's
        ``[hi − lo]`` piece of the new keep-mask, must equal the same columns of
        :meth:`select` on the whole vector. Called only when :attr:`selects_columns` is True;
        the default returns None (this applier needs all scores in one place, and the
        pipeline gathers them).

        Args:
            scores: this rank's saliencies ``[hi − lo]`` (weight granularity).
            mask: the whole current keep-mask, bool ``[d]`` (every rank holds it).
            sparsity: as for :meth:`select`.
            layout: the selected parameters (all of them).
            columns: this rank's ``(lo, hi)``.
        """
        return None

    def achieved_sparsity(self, mask: Tensor, layout: ParamLayout) -> float:
        """The sparsity of ``mask`` in this applier's units (for reports and schedules)."""
        return 1.0 - int(mask.count_nonzero()) / mask.numel() if mask.numel() else 0.0

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this applier cannot run with the other components, or None if it can."""
        return None
