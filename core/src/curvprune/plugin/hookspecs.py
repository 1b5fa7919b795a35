"""Hook specifications for curvprune plugins.

Builtin plugins (``curvprune.builtin.*``) and installed plugins (entry-point group ``curvprune``)
implement these hooks with the same :data:`curvprune.hookimpl` marker. A plugin implements only the
hooks it needs, and may accept only some of a hook's arguments.

Two families:

* **Registration hooks** run once per plugin when the component registry is built. They receive a
  ``register`` callable and are the only way components become available.
* **Lifecycle hooks** run once per pipeline run or per pruning step, for reports, logging and
  custom metrics. They observe; they never change what gets pruned. No hook runs inside a
  numerical loop (a pluggy call costs microseconds), and no hook dispatches by name: names resolve
  in the registry, which refuses duplicates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import pluggy
from torch import nn

from curvprune.plugin.registry import Register
from curvprune.roles.estimator import CurvatureEstimator
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.reports import PruneResult, StepReport
from curvprune.roles.scheduler import Scheduler
from curvprune.roles.scorer import SaliencyScorer

__all__ = ["ObservedPipeline", "hookspec"]

hookspec = pluggy.HookspecMarker("curvprune")


class ObservedPipeline(Protocol):
    """What a lifecycle hook sees of the running :class:`curvprune.Pipeline` (read only).

    The pipeline module sits above the plugin layer, so the hooks are typed against this
    protocol; a :class:`curvprune.Pipeline` satisfies it.
    """

    @property
    def config(self) -> Any:
        """The structured :class:`curvprune.PipelineConfig`."""

    @property
    def estimator(self) -> CurvatureEstimator | None:
        """The curvature estimator, or None."""

    @property
    def scorer(self) -> SaliencyScorer:
        """The saliency scorer."""

    @property
    def schedule(self) -> Scheduler:
        """The schedule."""

    @property
    def mask(self) -> MaskApplier:
        """The mask applier."""

    @property
    def components(self) -> Mapping[str, Any]:
        """The components by role, plus ``prune`` (the :class:`curvprune.config.PruneConfig`)."""

# ------------------------------------------------------------------------------------------------
# Registration hooks: called once per plugin when the registry is built; never during pruning.
# ------------------------------------------------------------------------------------------------


@hookspec
def curvprune_register_curvature_estimators(register: Register) -> None:
    """Register curvature estimators.

    Called once per plugin by :meth:`curvprune.PluginHost.build_registry`.

    :param register: call ``register(name, factory, config=ConfigClass)``. ``factory(config)``
        returns a :class:`curvprune.CurvatureEstimator`; ``config`` is a frozen attrs class
        (usually an :class:`curvprune.EstimatorConfig` subclass) structured from the ``[estimator]``
        table. A name registered twice raises :class:`curvprune.DuplicateComponentError` naming
        both plugins.
    :returns: nothing; results go through ``register``.
    """


@hookspec
def curvprune_register_saliency_scorers(register: Register) -> None:
    """Register saliency scorers (``[scorer]`` table).

    :param register: ``register(name, factory, config=ConfigClass)``; ``factory(config)`` returns
        a :class:`curvprune.SaliencyScorer`. Without ``config`` the scorer takes no options.
    :returns: nothing.
    """


@hookspec
def curvprune_register_schedulers(register: Register) -> None:
    """Register schedules (``[schedule]`` table).

    :param register: ``register(name, factory, config=ConfigClass)``; ``factory(config)`` returns
        a :class:`curvprune.Scheduler`.
    :returns: nothing.
    """


@hookspec
def curvprune_register_mask_appliers(register: Register) -> None:
    """Register mask appliers (``[mask]`` table).

    :param register: ``register(name, factory, config=ConfigClass)``; ``factory(config)`` returns
        a :class:`curvprune.MaskApplier`.
    :returns: nothing.
    """


# ------------------------------------------------------------------------------------------------
# Lifecycle hooks: once per run or per pruning step. Observers only.
# ------------------------------------------------------------------------------------------------


@hookspec
def curvprune_pipeline_start(pipeline: ObservedPipeline, model: nn.Module) -> None:
    """Called when :meth:`Pipeline.prune` or :meth:`Pipeline.attach` starts, before any compute.

    :param pipeline: the pipeline (its ``config`` and resolved components).
    :param model: the model about to be pruned. Do not modify it.
    :returns: nothing.
    """


@hookspec
def curvprune_after_prune_step(pipeline: ObservedPipeline, report: StepReport) -> None:
    """Called after every pruning step, once its masks are applied.

    :param pipeline: the pipeline.
    :param report: what the step did: target and achieved sparsity, per-layer sparsity, predicted
        and measured loss change, time per phase.
    :returns: nothing.
    """


@hookspec
def curvprune_pipeline_end(pipeline: ObservedPipeline, result: PruneResult) -> None:
    """Called when :meth:`Pipeline.prune` returns (or a session is closed) successfully.

    :param pipeline: the pipeline.
    :param result: the final result (masks, per-layer sparsity, all step reports).
    :returns: nothing.
    """
