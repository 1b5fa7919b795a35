"""What the step machinery, sessions and plans read of a built pipeline.

:class:`PipelineView` is the structural type of :class:`curvprune.Pipeline` as seen from the
modules below it (steps, sessions, planning), so they depend on this small protocol rather than
on the module that builds pipelines.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from curvprune.config import PipelineConfig
from curvprune.plugin.hookspecs import ObservedPipeline
from curvprune.plugin.manager import PluginHost
from curvprune.tensors.layout import ParamLayout

__all__ = ["PipelineView"]


class PipelineView(ObservedPipeline, Protocol):
    """A built pipeline: what lifecycle hooks see, plus its typed config, host and selection."""

    @property
    def config(self) -> PipelineConfig:
        """The structured config."""

    @property
    def host(self) -> PluginHost:
        """The plugin host whose lifecycle hooks observe the run."""

    @property
    def components(self) -> dict[str, Any]:
        """The built components by role, plus ``prune`` (what ``check_pipeline`` gets)."""

    def select(self, model: nn.Module) -> ParamLayout:
        """The parameters ``[prune] targets`` minus ``ignore`` select in ``model``."""
