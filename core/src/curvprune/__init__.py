"""curvprune: second-order neural-network pruning for PyTorch, as composable plugins.

The public API. Plugins import only these names (never ``curvprune._*`` or submodules not listed
here), so everything a third-party plugin needs is exported from this module.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from curvprune.api import RunOutcome, create, execute_run, load_pruned, plugins
from curvprune.builtin.masks import LayerwiseMask, NMMask
from curvprune.builtin.selection import prune_lowest
from curvprune.config import ComponentSpec, PipelineConfig, load_raw_config
from curvprune.errors import (
    ChannelCollapseWarning,
    CheckpointError,
    ConfigError,
    CurvpruneError,
    CurvpruneWarning,
    DuplicateComponentError,
    DuplicatePluginError,
    EstimatorStateError,
    MemoryPlanError,
    NumericalError,
    RankLostError,
    PluginHookError,
    PluginLoadError,
    SampleReuseWarning,
    StructureSkipWarning,
    UnknownComponentError,
    UnsupportedModelError,
    UnsupportedQuery,
)
from curvprune.pipeline.pipeline import Pipeline
from curvprune.pipeline.session import PruningSession
from curvprune.plugin.manager import PluginHost, PluginInfo, get_plugin_manager, hookimpl
from curvprune.plugin.registry import Component, Register, Registry
from curvprune.roles.context import PruneContext
from curvprune.roles.estimator import CurvatureEstimator, EstimatorConfig
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.reports import PruneResult, StepReport
from curvprune.roles.scheduler import Scheduler
from curvprune.roles.scorer import SaliencyScorer
from curvprune.roles.units import Granularity, Selection
from curvprune.structure.counting import count_flops_params
from curvprune.structure.graph import ChannelGroup, StructureGraph, Structures
from curvprune.structure.removal import RemovalResult, apply_removal, remove_structures
from curvprune.tensors import distributed
from curvprune.tensors.gradients import GradientSource, default_loss
from curvprune.tensors.layout import BlockLayout, ParamLayout, select_parameters
from curvprune.tensors.masks import MaskAwareOptimizer, MaskSet

try:
    __version__ = version("curvprune-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "ChannelCollapseWarning",
    "BlockLayout",
    "ChannelGroup",
    "CheckpointError",
    "Component",
    "ComponentSpec",
    "ConfigError",
    "CurvatureEstimator",
    "CurvpruneError",
    "CurvpruneWarning",
    "DuplicateComponentError",
    "DuplicatePluginError",
    "EstimatorConfig",
    "EstimatorStateError",
    "GradientSource",
    "Granularity",
    "MaskApplier",
    "LayerwiseMask",
    "MaskAwareOptimizer",
    "MaskSet",
    "MemoryPlanError",
    "NMMask",
    "NumericalError",
    "RankLostError",
    "ParamLayout",
    "Pipeline",
    "PipelineConfig",
    "PluginHookError",
    "PluginHost",
    "PluginInfo",
    "PluginLoadError",
    "PruneContext",
    "PruneResult",
    "PruningSession",
    "Register",
    "Registry",
    "RemovalResult",
    "RunOutcome",
    "SampleReuseWarning",
    "StructureSkipWarning",
    "SaliencyScorer",
    "Scheduler",
    "Selection",
    "StepReport",
    "StructureGraph",
    "Structures",
    "UnknownComponentError",
    "UnsupportedModelError",
    "UnsupportedQuery",
    "__version__",
    "apply_removal",
    "count_flops_params",
    "create",
    "default_loss",
    "distributed",
    "execute_run",
    "get_plugin_manager",
    "hookimpl",
    "load_pruned",
    "load_raw_config",
    "plugins",
    "prune_lowest",
    "remove_structures",
    "select_parameters",
]
