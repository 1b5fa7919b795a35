"""The scheduler role: when to prune, to which sparsity, and what to do around optimizer steps."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import attrs
import torch
from torch import Tensor

from curvprune.roles.context import PruneContext
from curvprune.tensors.layout import ParamLayout

if TYPE_CHECKING:
    from torch import nn

__all__ = ["LEVEL_TOLERANCE", "Scheduler", "StagedCalibration"]

#: A level at most this far above the current sparsity is not worth a pruning step.
LEVEL_TOLERANCE = 1e-12


@attrs.frozen(kw_only=True)
class StagedCalibration:
    """How a step runs stage by stage (:mod:`curvprune.pipeline.stages`).

    Attributes:
        stages: ``"block"`` (a transformer's repeated blocks fed from cached inputs, other
            layers one by one) or ``"layer"`` (every layer its own stage).
        num_samples: calibration samples; None: the estimator's ``num_grads`` (if the scorer
            uses an estimator), else 128.
    """

    stages: Literal["block", "layer"] = "block"
    num_samples: int | None = None


class Scheduler(abc.ABC):
    """Decides when to prune and to which sparsity.

    One-shot pruning asks :meth:`levels` for the sparsity of each sub-step (curvature is
    recomputed between sub-steps). Pruning during training asks :meth:`levels_at` after every
    optimizer step and runs one pruning step per level it returns (by default the one level of
    :meth:`level_at`, if any); :meth:`before_optimizer_step` lets a
    schedule act on gradients (penalties) before each optimizer step.

    ``during_training`` is True for schedules that only make sense inside a training loop
    (``Pipeline.prune`` refuses them; ``Pipeline.attach`` drives them).

    ``prune_phase`` is True for a during-training schedule that brings its own training phase
    (GReg: a penalty grows until the chosen units are near zero, then they are removed). Such a
    schedule decides at run time when it is done, so ``curvprune run`` gives it a *prune phase*
    before ``[finetune]``: it trains with :meth:`prune_phase_optimizer` (iterating the training
    data) until :meth:`finished`, at most :meth:`max_steps` steps, measures the accuracy right
    after the removal, then fine-tunes with a fresh optimizer and the masks held.
    """

    during_training: ClassVar[bool] = False
    prune_phase: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def levels(self, target: float, current: float = 0.0) -> list[float]:
        """Sparsity after each one-shot sub-step, ending at ``target``."""
        return [target]

    def level_at(self, step: int, target: float) -> float | None:
        """The sparsity to prune to after optimizer step ``step`` (0-based), or None."""
        return None

    def levels_at(self, step: int, target: float, current: float) -> list[float]:
        """List the levels of the pruning steps to run after optimizer step ``step``, in order.

        A pruning event may run several steps (sub-steps with the curvature recomputed
        between them). The default is :meth:`level_at` alone: one step when it returns a level
        above ``current`` (the sparsity already reached, in the mask applier's units), none
        otherwise.
        """
        level = self.level_at(step, target)
        if level is None or level <= current + LEVEL_TOLERANCE:
            return []
        return [level]

    def before_optimizer_step(self, step: int, model: nn.Module, layout: ParamLayout) -> None:
        """Act on gradients before optimizer step ``step`` (e.g. add a penalty). Default: no-op."""

    def finished(self, step: int) -> bool:
        """Whether no pruning event remains after ``step``."""
        return True

    def select(self, ctx: PruneContext) -> Tensor | None:
        """The keep-mask this schedule chooses itself at a pruning step, or None (the default).

        Most schedules only say *when* and *how much*; the scorer and mask applier choose *which*
        units go. A schedule that owns the choice (GReg fixes its pruned groups when its penalty
        starts) returns a bool ``[d]`` keep-mask here; the pipeline then skips the scorer and
        the mask applier's selection for this step and keeps ``ctx.mask & returned``.
        """
        return None

    def staged_calibration(self, components: Mapping[str, Any]) -> StagedCalibration | None:
        """How this schedule's steps calibrate stage by stage, or None (the default): every
        step sees the whole model and the data (dense calibration).

        Args:
            components: the pipeline's built components by role, plus ``prune``.
        """
        return None

    def prune_phase_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer of the prune phase (only for schedules with ``prune_phase``)."""
        raise NotImplementedError(f"{type(self).__name__} has no prune phase")

    def max_steps(self) -> int:
        """An upper bound on the prune phase's optimizer steps (only with ``prune_phase``)."""
        raise NotImplementedError(f"{type(self).__name__} has no prune phase")

    def state_dict(self) -> dict[str, Any]:
        """Serializable state (tensors and plain values) for checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Return why this schedule cannot run with the other components, or None if it can."""
        return None
