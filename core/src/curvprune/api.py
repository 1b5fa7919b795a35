"""Convenience entry points for notebooks: :func:`create`, :func:`plugins`, :func:`load_pruned`,
and :func:`execute_run` (a whole ``curvprune run`` from Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from curvprune.config import structure_component
from curvprune.plugin.manager import PluginHost, PluginInfo, get_plugin_manager
from curvprune.run.execute import RunOutcome, execute_run
from curvprune.run.export import load_pruned as _load_pruned

__all__ = ["RunOutcome", "create", "execute_run", "load_pruned", "plugins"]

_KIND_ALIASES = {
    "estimator": "estimator",
    "curvature_estimator": "estimator",
    "scorer": "scorer",
    "saliency_scorer": "scorer",
    "schedule": "schedule",
    "scheduler": "schedule",
    "mask": "mask",
    "mask_applier": "mask",
}


def create(kind: str, name: str, *, host: PluginHost | None = None, **config: Any) -> Any:
    """Build a component by kind and name, with its options as keyword arguments.

    >>> est = create("estimator", "dense", damping=1e-3)
    >>> type(est).__name__
    'DenseEstimator'

    Args:
        kind: ``estimator``, ``scorer``, ``schedule`` or ``mask``.
        name: the registered name.
        host: the plugin host to resolve names in (default: a fresh :func:`get_plugin_manager`).
        **config: the component's options, validated like a config table.

    Raises:
        ConfigError: unknown name or invalid options (one line each, with the closest match).
    """
    try:
        key = _KIND_ALIASES[kind]
    except KeyError:
        raise ValueError(
            f"unknown kind {kind!r}; kinds are estimator, scorer, schedule, mask"
        ) from None
    host = host or get_plugin_manager()
    spec = structure_component(host.registry, key, {"name": name, **config})
    component = host.registry.get(key, name)
    return component.factory(spec.config) if spec.config is not None else component.factory()


def plugins(host: PluginHost | None = None) -> list[PluginInfo]:
    """Every plugin with its distribution, version, hooks and components."""
    return (host or get_plugin_manager()).plugin_infos()


def load_pruned(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a pruned model from a run directory or an export folder into a fresh ``model``.

    ``model`` is a new instance of the run's architecture; it is shrunk first when the run
    removed channels physically. The loaded model's outputs equal the pruned model's. Only
    safetensors files are read: loading runs no code. See :func:`curvprune.run.export.load_pruned`.

    >>> from curvprune.run.models import build_model
    >>> # model = load_pruned("runs/<run>", build_model("digits-cnn", num_classes=10))

    Raises:
        ConfigError: missing or corrupt files, or weights that do not fit ``model`` (which is
            then left untouched).
    """
    return _load_pruned(path, model)
