"""Builtin schedules: ``oneshot`` (with curvature recomputation) and ``gradual`` (polynomial).

* ``oneshot`` prunes a trained model in ``steps`` sub-steps, the curvature recomputed from fresh
  gradients before each (the weights moved with the last compensating update). The sub-step
  levels follow M-FAC's geometric recomputations (a constant fraction of the remaining weights
  each time) or WoodFisher's ``--recompute-schedule poly``.
* ``gradual`` prunes during training on the polynomial schedule of Zhu & Gupta (2017), cubic by
  default as in WoodFisher's gradual runs; with ``substeps > 1`` each event prunes in geometric
  sub-steps with the curvature recomputed before each, as the M-FAC reference's ``--nrecomps``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import attrs

from curvprune.plugin.manager import hookimpl
from curvprune.plugin.registry import Register
from curvprune.roles.scheduler import LEVEL_TOLERANCE, Scheduler, StagedCalibration

__all__ = [
    "GradualConfig", "GradualSchedule", "OneShotConfig", "OneShotSchedule", "SequentialConfig",
    "SequentialSchedule", "sequential_problem", "spaced_levels",
]


def _positive(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


def _fraction(_: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{attribute.name} must be in [0, 1), got {value}")


def _check_level(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a sparsity in [0, 1), got {value}")


def spaced_levels(
    current: float, target: float, steps: int, spacing: str = "geometric", power: float = 2.0
) -> list[float]:
    """List the sparsity after each of ``steps`` sub-steps from ``current`` to ``target``.

    The rule of the ``oneshot`` schedule (see :class:`OneShotSchedule`), shared by the
    ``gradual`` schedule's ``substeps``. Levels are non-decreasing, within [current, target],
    the last exactly ``target``; empty when ``target <= current``.
    """
    if target <= current:
        return []
    fractions = [j / steps for j in range(1, steps)]
    if spacing == "geometric":
        ratio = (1.0 - target) / (1.0 - current)
        inner = [1.0 - (1.0 - current) * ratio**f for f in fractions]
    else:
        exponent = power if spacing == "poly" else 1.0
        inner = [current + (target - current) * (1.0 - (1.0 - f) ** exponent) for f in fractions]
    # Guard round-off: every level within [current, target], never decreasing.
    clipped = (min(max(level, current), target) for level in [*inner, target])
    return list(itertools.accumulate(clipped, max))


# --------------------------------------------------------------------------------------------
# oneshot
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class OneShotConfig:
    """Options of the ``oneshot`` schedule.

    Attributes:
        steps: pruning sub-steps, with the curvature recomputed before each, >= 1.
        spacing: how the sub-step levels are spaced: ``geometric`` (each sub-step removes the
            same fraction of the weights still kept), ``poly`` (fast first, then slower, shaped
            by ``power``) or ``linear`` (equal increments).
        power: the exponent of ``poly`` spacing, > 0.
        calibration: ``"dense"``: every step sees the whole model and the data;
            ``"sequential"``: every step runs stage by stage, each stage calibrated on the
            outputs of the stages already pruned (layer-local methods only, see
            :mod:`curvprune.pipeline.stages`); ``"auto"``: sequential when the scorer uses an
            estimator defined that way (SparseGPT, OBC), else dense.
        stages: with sequential calibration, ``"block"`` (a transformer's repeated blocks from
            cached inputs, other layers one by one) or ``"layer"`` (one stage per layer).
        calibration_samples: samples of sequential calibration; None: the estimator's
            ``num_grads`` when the scorer uses one, else 128.
    """

    steps: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    spacing: Literal["geometric", "poly", "linear"] = attrs.field(
        default="geometric", validator=attrs.validators.in_(("geometric", "poly", "linear"))
    )
    power: float = attrs.field(default=2.0, converter=float, validator=_positive)
    calibration: Literal["auto", "dense", "sequential"] = attrs.field(
        default="auto", validator=attrs.validators.in_(("auto", "dense", "sequential"))
    )
    stages: Literal["block", "layer"] = attrs.field(
        default="block", validator=attrs.validators.in_(("block", "layer"))
    )
    calibration_samples: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )


class OneShotSchedule(Scheduler):
    """One-shot pruning, optionally in sub-steps with the curvature recomputed between them.

    With current sparsity c, target t and K = ``steps``, sub-step j = 1..K prunes to:

    * ``geometric`` (M-FAC's recomputations): density d_j = (1−c)·((1−t)/(1−c))^(j/K), i.e.
      s_j = 1 − d_j; every sub-step keeps the same fraction of the weights it starts with.
    * ``poly`` (WoodFisher's ``--recompute-schedule poly``, degree p = ``power``):
      s_j = c + (t−c)·(1 − (1 − j/K)^p).
    * ``linear``: ``poly`` with p = 1.

    The last level is exactly t. Pruning is not driven by training steps, so :meth:`level_at`
    is always None.
    """

    during_training: ClassVar[bool] = False

    def __init__(self, config: OneShotConfig | None = None) -> None:
        super().__init__(config or OneShotConfig())

    def levels(self, target: float, current: float = 0.0) -> list[float]:
        """Sparsity after each sub-step, non-decreasing, the last exactly ``target``.

        Args:
            target: the sparsity to reach, in [0, 1).
            current: the sparsity already reached, in [0, 1).

        Returns:
            ``steps`` levels in (current, target]; empty when ``target <= current`` (masks
            never revive weights, so there is nothing to do).
        """
        _check_level("target", target)
        _check_level("current", current)
        cfg = self.config
        return spaced_levels(current, target, cfg.steps, cfg.spacing, cfg.power)

    def staged_calibration(self, components: Mapping[str, Any]) -> StagedCalibration | None:
        """Sequential calibration when ``calibration`` asks for it (or ``auto`` and the
        scorer's estimator prefers it), else None."""
        mode = self.config.calibration
        if mode == "auto":
            scorer, estimator = components.get("scorer"), components.get("estimator")
            uses = estimator is not None and getattr(scorer, "needs_curvature", False)
            mode = "sequential" if uses and estimator.prefers_sequential else "dense"
        if mode == "dense":
            return None
        cfg = self.config
        return StagedCalibration(stages=cfg.stages, num_samples=cfg.calibration_samples)

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """With sequential calibration, refuse what needs the whole model.

        See :func:`sequential_problem`.
        """
        if self.staged_calibration(components) is None:
            return None
        return sequential_problem(components)


def sequential_problem(components: Mapping[str, Any]) -> str | None:
    """Why these components cannot prune stage by stage, or None if they can.

    Every stage sees only its own layers and their inputs: the scorer and the estimator it uses
    must be layer-local (no loss, no gradient), and the mask applier must decide each parameter
    on its own.
    """
    scorer, estimator = components["scorer"], components.get("estimator")
    mask, prune = components["mask"], components.get("prune")
    why = "sequential calibration prunes one stage at a time from its inputs"
    fix = "or set calibration = 'dense' @ schedule.calibration"
    if not scorer.layer_local or scorer.needs_gradient:
        return (
            f"{why}, but the scorer needs the whole model's loss; use wanda, obs or magnitude "
            f"{fix}"
        )
    if scorer.needs_curvature and estimator is not None and not estimator.layer_local:
        return (
            f"{why}, but estimator {type(estimator).__name__} fits the loss's curvature of the "
            f"whole model; use a layer-wise estimator (sparsegpt) {fix}"
        )
    if not mask.per_parameter:
        return (
            f"{why}, so the mask must decide each layer on its own (layerwise or nm), not "
            f"{getattr(mask, 'name', type(mask).__name__)!r} {fix}"
        )
    if prune is not None and prune.audit_single:
        return (
            f"{why}; the single-weight audit needs the whole model's loss: set audit_single = 0 "
            f"{fix}"
        )
    return None


# --------------------------------------------------------------------------------------------
# sequential
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class SequentialConfig(OneShotConfig):
    """Options of the ``sequential`` schedule: ``oneshot`` with ``calibration = "sequential"``."""

    calibration: Literal["sequential"] = attrs.field(
        default="sequential", validator=attrs.validators.in_(("sequential",))
    )


class SequentialSchedule(OneShotSchedule):
    """One-shot pruning with sequential (layer-by-layer) calibration, the papers' mode for
    OBC, SparseGPT and (optionally) WANDA; the same as ``oneshot`` with
    ``calibration = "sequential"``."""

    def __init__(self, config: SequentialConfig | None = None) -> None:
        super().__init__(config or SequentialConfig())


# --------------------------------------------------------------------------------------------
# gradual
# --------------------------------------------------------------------------------------------
@attrs.frozen(kw_only=True)
class GradualConfig:
    """Options of the ``gradual`` schedule (steps are optimizer steps, 0-based).

    Attributes:
        start: step of the first pruning event, >= 0.
        end: step of the last pruning event, which reaches the target, >= ``start``.
        frequency: steps between pruning events, >= 1.
        power: exponent of the polynomial (3: the cubic schedule), > 0.
        initial_sparsity: s_i, the level of the first event, in [0, 1).
        substeps: pruning sub-steps per event, >= 1: each event goes from the current level to
            s(t) in ``substeps`` geometrically spaced sub-steps (the ``oneshot`` schedule's
            ``geometric`` rule), each with fresh gradients and curvature. 16 is the M-FAC
            reference's ``--nrecomps`` default.
    """

    start: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    end: int = attrs.field(default=1000)
    frequency: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    power: float = attrs.field(default=3.0, converter=float, validator=_positive)
    initial_sparsity: float = attrs.field(default=0.0, converter=float, validator=_fraction)
    substeps: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    @end.validator
    def _end_after_start(self, attribute: attrs.Attribute, value: int) -> None:
        if value < self.start:
            raise ValueError(f"end must be >= start ({self.start}), got {value}")


class GradualSchedule(Scheduler):
    """Polynomial gradual pruning during training (Zhu & Gupta, 2017, Eq. 1).

    With s_i = ``initial_sparsity``, s_f the target, t₀ = ``start``, t_e = ``end`` and
    k = ``power``, the level at a pruning event t is::

        s(t) = s_f − (s_f − s_i)·(1 − (t − t₀)/(t_e − t₀))^k        (s(t) = s_f if t_e = t₀)

    Events are at t₀, t₀ + ``frequency``, ... up to t_e, **and at t_e itself**. The reference
    implementations prune only on the grid, so when (t_e − t₀) is not a multiple of the
    frequency their last event falls short of s_f (WoodFisher's ResNet-50 config, t₀ = 1,
    t_e = 40, frequency 5, ends at s(36) ≈ 0.899 instead of 0.9); the extra event at t_e makes
    the schedule reach the target exactly.

    With ``substeps`` = K > 1 an event does not prune to s(t) at once: :meth:`levels_at`
    splits the way from the current sparsity c to s(t) into K geometric sub-steps,
    density (1−c)·((1−s(t))/(1−c))^(j/K) after sub-step j, each with fresh gradients and a fresh
    curvature estimate (the session runs one pruning step per level). The M-FAC reference's
    gradual runs do this with K = ``--nrecomps`` = 16.

    The schedule is stateless given the step; :meth:`state_dict` is empty.
    """

    during_training: ClassVar[bool] = True

    def __init__(self, config: GradualConfig | None = None) -> None:
        super().__init__(config or GradualConfig())

    def event_steps(self) -> list[int]:
        """List the optimizer steps at which pruning happens, ascending."""
        cfg = self.config
        grid = range(cfg.start, cfg.end + 1, cfg.frequency)
        return [*grid] if grid[-1] == cfg.end else [*grid, cfg.end]

    def is_event(self, step: int) -> bool:
        """Whether pruning happens after optimizer step ``step``."""
        cfg = self.config
        on_grid = (step - cfg.start) % cfg.frequency == 0
        return cfg.start <= step <= cfg.end and (on_grid or step == cfg.end)

    def sparsity_at(self, step: int, target: float) -> float:
        """s(t) of the polynomial schedule at any step (clamped to [t₀, t_e])."""
        cfg = self.config
        if cfg.end == cfg.start or step >= cfg.end:
            return target
        progress = max(step - cfg.start, 0) / (cfg.end - cfg.start)
        # s_i + (s_f − s_i)·(1 − (1 − p)^k), the same s(t), written to give s_i exactly at t₀.
        growth = 1.0 - (1.0 - progress) ** cfg.power
        return cfg.initial_sparsity + (target - cfg.initial_sparsity) * growth

    def level_at(self, step: int, target: float) -> float | None:
        """s(step) at a pruning event, else None."""
        _check_level("target", target)
        return self.sparsity_at(step, target) if self.is_event(step) else None

    def levels_at(self, step: int, target: float, current: float) -> list[float]:
        """List the sub-step levels of the event after ``step`` (empty if there is none).

        ``substeps`` levels from ``current`` to s(step), geometrically spaced (the ``oneshot``
        schedule's rule): each sub-step keeps the same fraction of the weights it starts with.
        Empty when ``step`` is no event or s(step) <= ``current``.
        """
        level = self.level_at(step, target)
        if level is None or level <= current + LEVEL_TOLERANCE:
            return []
        return spaced_levels(current, level, self.config.substeps, "geometric")

    def finished(self, step: int) -> bool:
        """Return True from ``end`` on: no pruning event remains after that step."""
        return step >= self.config.end

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the level is a function of the step, which the session checkpoints."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

    def check_pipeline(self, components: Mapping[str, Any]) -> str | None:
        """Refuse an ``initial_sparsity`` above the target (the schedule would go backwards)."""
        prune = components.get("prune")
        s_i = self.config.initial_sparsity
        if prune is not None and s_i > prune.sparsity:
            return (
                f"gradual schedule starts at initial_sparsity = {s_i:g}, above prune.sparsity = "
                f"{prune.sparsity:g}; lower initial_sparsity @ schedule.initial_sparsity"
            )
        return None


@hookimpl
def curvprune_register_schedulers(register: Register) -> None:
    """Register ``oneshot``, ``sequential`` and ``gradual``."""
    register("oneshot", OneShotSchedule, config=OneShotConfig)
    register("sequential", SequentialSchedule, config=SequentialConfig)
    register("gradual", GradualSchedule, config=GradualConfig)
