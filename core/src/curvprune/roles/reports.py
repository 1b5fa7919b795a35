"""What a pruning step and a pruning run report: plain data, JSON-ready.

:class:`StepReport` goes to the ``curvprune_after_prune_step`` hook and into ``result.json``;
:class:`PruneResult` is what :meth:`Pipeline.prune` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from torch import Tensor

from curvprune.tensors.masks import MaskSet

__all__ = ["PruneResult", "StepReport"]


@attrs.define(kw_only=True)
class StepReport:
    """One pruning step.

    Attributes:
        step: index of the step in the run (0-based).
        target_sparsity: the sparsity this step pruned to.
        sparsity: the sparsity reached (fraction of selected weights removed).
        unit_sparsity: the sparsity in the mask applier's units (channels for structured masks).
        per_layer: fraction removed per selected parameter.
        num_pruned: weights removed by this step.
        predicted_loss_change: the scorer's predicted loss increase (None if it predicts none).
        loss_before: loss on the audit samples before the step (None if not measured).
        loss_after: loss on the audit samples after the step (None if not measured).
        num_grads: gradients fed to the estimator (0 without one).
        times: seconds per phase (``gradients``, ``scores``, ``update``, ``total``).
        train_step: optimizer step after which the step ran (None for one-shot pruning).
        single_audit: the single-weight loss-change audit run before the step
            (:meth:`curvprune.pipeline.audit.SingleWeightAudit.to_dict`; None when ``[prune]
            audit_single`` is 0 or the scorer predicts no loss change).
        ranks: under torch.distributed, one entry per rank: seconds of ``gradients``,
            ``communication``, ``curvature`` and ``scoring`` and the peak memory of the
            ``collect`` and ``answer`` phases (:mod:`curvprune.pipeline.rankstats`); None in
            one process.
    """

    step: int
    target_sparsity: float
    sparsity: float
    unit_sparsity: float
    per_layer: dict[str, float]
    num_pruned: int
    predicted_loss_change: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    num_grads: int = 0
    times: dict[str, float] = attrs.field(factory=dict)
    train_step: int | None = None
    single_audit: dict[str, Any] | None = None
    ranks: list[dict[str, Any]] | None = None

    @property
    def measured_loss_change(self) -> float | None:
        """``loss_after - loss_before`` when both were measured."""
        if self.loss_before is None or self.loss_after is None:
            return None
        return self.loss_after - self.loss_before

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (adds ``measured_loss_change``)."""
        out = attrs.asdict(self)
        out["measured_loss_change"] = self.measured_loss_change
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepReport:
        """The inverse of :meth:`to_dict` (``measured_loss_change`` is derived, so ignored)."""
        names = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@attrs.define(kw_only=True)
class PruneResult:
    """The outcome of :meth:`Pipeline.prune` (or of a closed :class:`PruningSession`).

    Attributes:
        masks: the final keep-masks.
        steps: one report per pruning step.
        seconds: wall time of the whole call.
    """

    masks: MaskSet
    steps: list[StepReport] = attrs.field(factory=list)
    seconds: float = 0.0

    @property
    def sparsity(self) -> float:
        """Fraction of selected weights removed."""
        return self.masks.sparsity()

    @property
    def per_layer(self) -> dict[str, float]:
        """Fraction removed per selected parameter."""
        return self.masks.per_layer_sparsity()

    def mask_tensors(self) -> dict[str, Tensor]:
        """Per-parameter boolean masks."""
        return self.masks.tensors()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (masks excluded: they are saved as safetensors)."""
        return {
            "sparsity": self.sparsity,
            "per_layer": self.per_layer,
            "steps": [s.to_dict() for s in self.steps],
            "seconds": self.seconds,
        }
