"""curvprune: second-order neural-network pruning for PyTorch, as composable plugins.

The public API. Plugins import only these names (never ``curvprune._*`` or submodules not listed
here), so everything a third-party plugin needs is exported from this module.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from curvprune.api import create, plugins
from curvprune.config import ComponentSpec, PipelineConfig, load_raw_config
from curvprune.errors import (
    ConfigError,
    CurvpruneError,
    DuplicateComponentError,
    DuplicatePluginError,
    EstimatorStateError,
    MemoryPlanError,
    NumericalError,
    PluginLoadError,
    UnknownComponentError,
    UnsupportedQuery,
)
from curvprune.gradients import GradientSource
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
from curvprune.report import PruneResult, StepReport

try:
    __version__ = version("curvprune-core")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BlockLayout",
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
    "PluginHost",
    "PluginInfo",
    "PluginLoadError",
    "PruneContext",
    "PruneResult",
    "PruningSession",
    "Register",
    "Registry",
    "SaliencyScorer",
    "Scheduler",
    "StepReport",
    "UnknownComponentError",
    "UnsupportedQuery",
    "__version__",
    "create",
    "get_plugin_manager",
    "hookimpl",
    "load_raw_config",
    "plugins",
    "select_parameters",
]
