"""Pruning inside the user's training loop: :class:`PruningSession`."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import torch

from curvprune.pipeline.steps import StepRunner
from curvprune.pipeline.view import PipelineView
from curvprune.roles.reports import PruneResult, StepReport
from curvprune.tensors.masks import MaskSet

__all__ = ["PruningSession"]


class PruningSession:
    """Prunes inside a training loop and keeps pruned weights at zero.

    Use it as::

        session = pipeline.attach(model, optimizer, data=loader)
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            session.before_optimizer_step()
            optimizer.step()
            session.step()
        result = session.close()
    """

    def __init__(
        self, pipeline: PipelineView, runner: StepRunner, optimizer: torch.optim.Optimizer
    ) -> None:
        self.pipeline = pipeline
        self._runner = runner
        self.optimizer = optimizer
        self.iteration = 0
        self._started = time.perf_counter()
        self._closed = False
        self._sparsity_of: MaskSet | None = None  # the masks self._sparsity was computed for
        self._sparsity = 0.0
        masks = runner.masks
        if masks.extra or masks.num_removed():  # masks given to attach: the state may predate them
            masks.mask_optimizer_(optimizer, runner.model)

    @property
    def masks(self) -> MaskSet:
        """The current masks."""
        return self._runner.masks

    @property
    def reports(self) -> list[StepReport]:
        """Reports of the pruning steps so far."""
        return self._runner.reports

    def before_optimizer_step(self) -> None:
        """Zero the gradients of pruned weights and let the schedule act (e.g. add a penalty)."""
        runner = self._runner
        runner.masks.mask_grads_(runner.model)
        self.pipeline.schedule.before_optimizer_step(self.iteration, runner.model, runner.layout)

    def step(self) -> StepReport | None:
        """After ``optimizer.step()``: re-zero pruned weights and state, prune if it is time.

        After every pruning step the optimizer's state loses the pruned coordinates
        (:meth:`MaskSet.mask_optimizer_`: state shaped like a parameter, and
        ``optimizer.apply_masks`` for a :class:`~curvprune.tensors.masks.MaskAwareOptimizer`).

        At a pruning event the schedule may ask for several sub-steps
        (:meth:`~curvprune.roles.scheduler.Scheduler.levels_at`, e.g. the ``gradual``
        schedule's ``substeps``); each is a full pruning step with fresh gradients and its own
        report in :attr:`reports`.

        Returns:
            The report of the last pruning step that ran, or None.
        """
        runner = self._runner
        runner.masks.apply_(runner.model)
        runner.masks.mask_optimizer_state_(self.optimizer, runner.model)
        schedule = self.pipeline.schedule
        levels = schedule.levels_at(
            self.iteration, self.pipeline.config.prune.sparsity, self._current_sparsity()
        )
        report = None
        for level in levels:
            report = runner.step(level, train_step=self.iteration)
            # Momentum and moments, and any state an optimizer couples across coordinates.
            runner.masks.mask_optimizer_(self.optimizer, runner.model)
        self.iteration += 1
        return report

    def _current_sparsity(self) -> float:
        """Return the mask applier's sparsity of the current masks (once per mask set)."""
        masks = self._runner.masks
        if self._sparsity_of is not masks:
            self._sparsity = self.pipeline.mask.achieved_sparsity(masks.flat, self._runner.layout)
            self._sparsity_of = masks
        return self._sparsity

    def state_dict(self) -> dict[str, Any]:
        """Iteration, masks, schedule state and step reports, for checkpoints.

        Only tensors and plain values, so ``torch.load(..., weights_only=True)`` reads it back.
        The estimator has no state to save: the pipeline re-fits it from fresh gradients at every
        pruning step (``setup`` then ``update``), and seeds those gradients by the step index,
        which the reports' count restores.
        """
        return {
            "iteration": self.iteration,
            "masks": self._runner.masks.flat.clone(),
            "extra_masks": {n: m.clone() for n, m in self._runner.masks.extra.items()},
            "schedule": self.pipeline.schedule.state_dict(),
            "reports": [r.to_dict() for r in self._runner.reports],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output and re-apply the masks."""
        self.iteration = int(state["iteration"])
        flat = state["masks"].to(self._runner.masks.flat.device)
        extra = state.get("extra_masks", {})
        self._runner.masks = MaskSet(self._runner.layout, flat, extra).with_structure_gates()
        self.pipeline.schedule.load_state_dict(state["schedule"])
        if "reports" in state:
            self._runner.reports = [StepReport.from_dict(r) for r in state["reports"]]
        self._runner.masks.apply_(self._runner.model)

    def close(self) -> PruneResult:
        """Finish the session: call ``curvprune_pipeline_end`` and return the result."""
        result = PruneResult(
            masks=self._runner.masks,
            steps=self._runner.reports,
            seconds=time.perf_counter() - self._started,
        )
        if not self._closed:
            self._closed = True
            self.pipeline.host.pipeline_end(self.pipeline, result)
        return result

    def __enter__(self) -> PruningSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
