"""The units a step decides on: :data:`Granularity` and a joint choice, :class:`Selection`.

A leaf of the roles layer, so that every role may name them without importing the others.
"""

from __future__ import annotations

from typing import Literal

import attrs
from torch import Tensor

__all__ = ["Granularity", "Selection"]

Granularity = Literal["weight", "channel"]


@attrs.frozen(kw_only=True)
class Selection:
    """A step's choice and update made together (:meth:`SaliencyScorer.select`).

    Attributes:
        keep: the new keep-mask, bool ``[d]``, a subset of the step's mask.
        update: the weight update δw ``[d]`` to add before the pruned weights are zeroed, or
            None for none.
        predicted_loss_change: the loss increase the method predicts (0-dim), or None.
    """

    keep: Tensor
    update: Tensor | None = None
    predicted_loss_change: Tensor | None = None
