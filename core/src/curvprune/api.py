"""Convenience entry points for notebooks: :func:`create` and :func:`plugins`."""

from __future__ import annotations

from typing import Any

from curvprune.config import structure_component
from curvprune.plugins import PluginHost, PluginInfo, get_plugin_manager

__all__ = ["create", "plugins"]

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
