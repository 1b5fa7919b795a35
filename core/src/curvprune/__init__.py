"""curvprune: second-order neural-network pruning for PyTorch, as composable plugins.

The public API. Plugins import only these names (never ``curvprune._*`` or submodules not listed
here), so everything a third-party plugin needs is exported from this module.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from curvprune import distributed
from curvprune.api import create, load_pruned, plugins
from curvprune.config import ComponentSpec, PipelineConfig, load_raw_config
from curvprune.errors import (
    CheckpointError,
    ConfigError,
    CurvpruneError,
    DuplicateComponentError,
    DuplicatePluginError,
    EstimatorStateError,
    MemoryPlanError,
    NumericalError,
    PluginHookError,
    PluginLoadError,
    UnknownComponentError,
    UnsupportedModelError,
    UnsupportedQuery,
)
from curvprune.gradients import GradientSource, default_loss
from curvprune.interfaces import (
    CurvatureEstimator,
    EstimatorConfig,
    Granularity,
    MaskApplier,
    PruneContext,
    SaliencyScorer,
    Scheduler,
)
from curvprune.layout import BlockLayout, ParamLayout, select_parameters
from curvprune.masking import MaskSet
from curvprune.pipeline import Pipeline, PruningSession
from curvprune.plugins import PluginHost, PluginInfo, get_plugin_manager, hookimpl
from curvprune.registry import Component, Register, Registry
from curvprune.removal import RemovalResult, apply_removal, count_flops_params, remove_structures
from curvprune.report import PruneResult, StepReport
from curvprune.structures import ChannelGroup, StructureGraph, Structures

try:
    __version__ = version("curvprune-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BlockLayout",
    "ChannelGroup",
    "CheckpointError",
    "Component",
    "ComponentSpec",
    "ConfigError",
    "CurvatureEstimator",
    "CurvpruneError",
    "DuplicateComponentError",
    "DuplicatePluginError",
    "EstimatorConfig",
    "EstimatorStateError",
    "GradientSource",
    "Granularity",
    "MaskApplier",
    "MaskSet",
    "MemoryPlanError",
    "NumericalError",
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
    "SaliencyScorer",
    "Scheduler",
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
    "get_plugin_manager",
    "hookimpl",
    "load_pruned",
    "load_raw_config",
    "plugins",
    "remove_structures",
    "select_parameters",
]
