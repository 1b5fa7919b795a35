"""What the step machinery, sessions and plans read of a built pipeline.

:class:`PipelineView` is the structural type of :class:`curvprune.Pipeline` as seen from the
modules below it (steps, sessions, planning), so they depend on this small protocol rather than
on the module that builds pipelines.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from curvprune.config import PipelineConfig
from curvprune.plugin.manager import PluginHost
from curvprune.roles.estimator import CurvatureEstimator
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.scheduler import Scheduler
from curvprune.roles.scorer import SaliencyScorer
from curvprune.tensors.layout import ParamLayout

__all__ = ["PipelineView"]


class PipelineView(Protocol):
    """A built pipeline: its config, plugin host and components (read only)."""

    @property
    def config(self) -> PipelineConfig:
        """The structured config."""

    @property
    def host(self) -> PluginHost:
        """The plugin host whose lifecycle hooks observe the run."""

    @property
    def estimator(self) -> CurvatureEstimator | None:
        """The curvature estimator (None without an ``[estimator]`` table)."""

    @property
    def scorer(self) -> SaliencyScorer:
        """The saliency scorer."""

    @property
    def schedule(self) -> Scheduler:
        """The schedule."""

    @property
    def mask(self) -> MaskApplier:
        """The mask applier."""

    def select(self, model: nn.Module) -> ParamLayout:
        """The parameters ``[prune] targets`` minus ``ignore`` select in ``model``."""
