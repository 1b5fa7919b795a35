"""The component registry: names to factories and config classes, per kind.

Plugins fill it through the registration hooks; the pipeline and :func:`curvprune.create` resolve
names in it. Registering a name twice for one kind raises, naming both plugins: plugin order never
decides which implementation runs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs

from curvprune.errors import DuplicateComponentError, UnknownComponentError
from curvprune.roles.estimator import CurvatureEstimator
from curvprune.roles.mask_applier import MaskApplier
from curvprune.roles.scheduler import Scheduler
from curvprune.roles.scorer import SaliencyScorer

__all__ = ["KINDS", "Component", "Register", "Registry", "Kind"]


@attrs.frozen
class Kind:
    """One role: its config-table name, human name, base class and registration hook."""

    key: str
    title: str
    base: type
    hook: str


KINDS: dict[str, Kind] = {
    k.key: k
    for k in (
        Kind("estimator", "curvature estimator", CurvatureEstimator,
             "curvprune_register_curvature_estimators"),
        Kind("scorer", "saliency scorer", SaliencyScorer, "curvprune_register_saliency_scorers"),
        Kind("schedule", "schedule", Scheduler, "curvprune_register_schedulers"),
        Kind("mask", "mask applier", MaskApplier, "curvprune_register_mask_appliers"),
    )
}

_NAME = re.compile(r"[a-z][a-z0-9_\-]*")


class Register(Protocol):
    """The callable handed to registration hooks."""

    def __call__(
        self, name: str, factory: Callable[..., Any], *, config: type | None = None
    ) -> None:
        """Register ``factory`` under ``name``; ``config`` is its frozen attrs config class."""


@attrs.frozen
class Component:
    """A registered component.

    Attributes:
        kind: ``estimator``, ``scorer``, ``schedule`` or ``mask``.
        name: the name used in config files.
        factory: ``factory(config)`` builds the component.
        config: the attrs config class, or None for a component without options.
        plugin: the pluggy name of the plugin that registered it.
        distribution: the distribution that installed that plugin (None for in-process plugins).
        version: that distribution's version.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type | None
    plugin: str
    distribution: str | None = None
    version: str | None = None

    def config_fields(self) -> list[tuple[str, str, Any]]:
        """``(name, type, default)`` for each config field (``attrs.NOTHING`` if required)."""
        if self.config is None:
            return []
        try:  # the defaults as a config built with none given (factories that read others too)
            instance = self.config()
        except (TypeError, ValueError):  # a required option: read the defaults one by one
            instance = None
        out = []
        for field in attrs.fields(self.config):
            default = field.default
            if instance is not None:
                default = getattr(instance, field.name)
            elif isinstance(default, attrs.Factory):  # type: ignore[arg-type]
                default = "(depends on other options)" if default.takes_self else default.factory()
            typ = field.type if isinstance(field.type, str) else getattr(
                field.type, "__name__", repr(field.type)
            )
            out.append((field.name, str(typ), default))
        return out


class Registry:
    """Components by kind and name."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}

    def register(
        self,
        kind: str,
        name: str,
        factory: Callable[..., Any],
        *,
        config: type | None = None,
        plugin: str = "<direct>",
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        """Add a component; see :class:`Register` for what plugins call."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        title = KINDS[kind].title
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise TypeError(
                f"plugin {plugin!r} registered {title} name {name!r}: names are lowercase "
                "identifiers (letters, digits, '_' and '-')"
            )
        if not callable(factory):
            raise TypeError(f"plugin {plugin!r} registered {title} {name!r} with a non-callable")
        if config is not None and not attrs.has(config):
            raise TypeError(
                f"plugin {plugin!r} registered {title} {name!r} with config={config!r}, "
                "which is not an attrs class"
            )
        existing = self._components[kind].get(name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{title} {name!r} is registered twice: by plugin {existing.plugin!r}"
                f"{_dist(existing)} and by plugin {plugin!r}{_dist_of(distribution, version)}; "
                "uninstall or block one (CURVPRUNE_DISABLE_PLUGINS)"
            )
        self._components[kind][name] = Component(
            kind, name, factory, config, plugin, distribution, version
        )

    def registrar(
        self, kind: str, plugin: str, distribution: str | None = None, version: str | None = None
    ) -> Register:
        """A :class:`Register` callable that records ``plugin`` as the provider."""

        def register(name: str, factory: Callable[..., Any], *, config: type | None = None) -> None:
            self.register(
                kind, name, factory, config=config, plugin=plugin,
                distribution=distribution, version=version,
            )

        return register

    def get(self, kind: str, name: str) -> Component:
        """The component ``name`` of ``kind``; raises :class:`UnknownComponentError`."""
        try:
            return self._components[kind][name]
        except KeyError:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}") from None
            raise UnknownComponentError(KINDS[kind].title, name, self.names(kind)) from None

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self._components[kind])

    def __iter__(self) -> Iterator[Component]:
        for kind in KINDS:
            yield from (self._components[kind][n] for n in self.names(kind))

    def __contains__(self, key: tuple[str, str]) -> bool:
        kind, name = key
        return name in self._components.get(kind, {})


def _dist_of(distribution: str | None, version: str | None) -> str:
    return f" ({distribution} {version})" if distribution else ""


def _dist(component: Component) -> str:
    return _dist_of(component.distribution, component.version)
