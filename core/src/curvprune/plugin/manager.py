"""The plugin manager factory and the typed facade the rest of curvprune calls.

Discovery order: the builtin plugins first (``curvprune.builtin.*``, registered through the same
hooks as everybody else), then installed plugins from the entry-point group ``curvprune``, then
plugins passed explicitly. Nothing depends on that order: components resolve by name in a
registry that refuses duplicates.

Environment switches:

* ``CURVPRUNE_DISABLE_PLUGINS=a,b``: block plugins by name (builtins too, e.g. ``builtin.masks``).
* ``CURVPRUNE_DISABLE_PLUGIN_AUTOLOAD=1``: load no installed plugin, only builtins.
* ``CURVPRUNE_TRACE_PLUGINS=1``: log every hook call (event ``hook_called``).
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import os
from collections.abc import Iterable, Sequence
from typing import Any, final

import attrs
import pluggy
from torch import nn

from curvprune._log import get_logger
from curvprune.errors import (
    ConfigError,
    CurvpruneError,
    DuplicatePluginError,
    PluginHookError,
    PluginLoadError,
)
from curvprune.plugin import hookspecs
from curvprune.plugin.hookspecs import ObservedPipeline
from curvprune.plugin.registry import KINDS, Component, Registry
from curvprune.roles.reports import PruneResult, StepReport

__all__ = [
    "BUILTIN_PLUGINS",
    "ENTRY_POINT_GROUP",
    "PluginHost",
    "PluginInfo",
    "get_plugin_manager",
    "hookimpl",
]

PROJECT = ENTRY_POINT_GROUP = "curvprune"

#: The marker plugins put on their hook implementations.
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Builtin plugins: (pluggy name, module). Blockable by name like any plugin.
BUILTIN_PLUGINS: tuple[tuple[str, str], ...] = (
    ("builtin.scorers", "curvprune.builtin.scorers"),
    ("builtin.schedules", "curvprune.builtin.schedules"),
    ("builtin.masks", "curvprune.builtin.masks"),
    ("builtin.dense", "curvprune.builtin.dense"),
)

log = get_logger(__name__)


def _env_list(var: str) -> list[str]:
    return [x.strip() for x in os.environ.get(var, "").split(",") if x.strip()]


def _truthy(var: str) -> bool:
    return os.environ.get(var, "").strip().lower() not in ("", "0", "false", "no")


def _installed_entry_points(taken: Iterable[str]) -> list[metadata.EntryPoint]:
    """Entry points of group ``curvprune``, checked for conflicts pluggy would hide.

    Identical duplicates (a distribution seen twice on ``sys.path``) are dropped; two
    distributions claiming one name, or a name taken by a builtin, raise.
    """
    seen: dict[str, metadata.EntryPoint] = {}
    taken = set(taken)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in taken:
            raise DuplicatePluginError(
                f"entry point {ep.name!r} of {_dist_label(ep)} clashes with the builtin plugin "
                f"of the same name; rename the entry point"
            )
        first = seen.get(ep.name)
        if first is None:
            seen[ep.name] = ep
        elif first.value != ep.value or _dist_name(first) != _dist_name(ep):
            raise DuplicatePluginError(
                f"two distributions declare the curvprune plugin {ep.name!r}: "
                f"{_dist_label(first)} ({first.value}) and {_dist_label(ep)} ({ep.value}); "
                "uninstall one of them"
            )
    return list(seen.values())


def _dist_name(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.metadata["Name"] if dist is not None else None


def _dist_version(ep: metadata.EntryPoint) -> str | None:
    dist = getattr(ep, "dist", None)
    return dist.version if dist is not None else None


def _dist_label(ep: metadata.EntryPoint) -> str:
    name = _dist_name(ep)
    return f"{name} {_dist_version(ep)}" if name else "an unknown distribution"


def get_plugin_manager(
    *,
    autoload: bool | None = None,
    blocked: Iterable[str] = (),
    plugins: Iterable[tuple[str, object]] = (),
) -> PluginHost:
    """Build a fresh plugin manager (a factory: no global state) wrapped in a :class:`PluginHost`.

    Args:
        autoload: load installed plugins from entry points; None reads
            ``CURVPRUNE_DISABLE_PLUGIN_AUTOLOAD``.
        blocked: plugin names to block, added to ``CURVPRUNE_DISABLE_PLUGINS``.
        plugins: extra ``(name, plugin)`` pairs registered last (in-process plugins, tests).

    Returns:
        The host; ``host.pm`` is the underlying :class:`pluggy.PluginManager`.

    Raises:
        PluginLoadError: an installed plugin failed to import (names the plugin and its
            distribution, and how to block it).
        DuplicatePluginError: two distributions declare one plugin name.
        pluggy.PluginValidationError: a hook implementation does not match its spec, or a
            plugin implements a hook that does not exist.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in (*blocked, *_env_list("CURVPRUNE_DISABLE_PLUGINS")):
        pm.set_blocked(name)
    dists: dict[str, tuple[str | None, str | None]] = {}
    for name, modname in BUILTIN_PLUGINS:
        if not pm.is_blocked(name):
            pm.register(importlib.import_module(modname), name=name)
            dists[name] = ("curvprune-core", _core_version())
    if autoload is None:
        autoload = not _truthy("CURVPRUNE_DISABLE_PLUGIN_AUTOLOAD")
    if autoload:
        for ep in _installed_entry_points(taken=(n for n, _ in BUILTIN_PLUGINS)):
            if pm.is_blocked(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginLoadError(
                    f"plugin {ep.name!r} ({_dist_label(ep)}, entry point {ep.value}) failed to "
                    f"import: {type(exc).__name__}: {exc}; block it with "
                    f"CURVPRUNE_DISABLE_PLUGINS={ep.name}"
                ) from exc
            pm.register(module, name=ep.name)
            dists[ep.name] = (_dist_name(ep), _dist_version(ep))
            log.debug("plugin_loaded", plugin=ep.name, distribution=_dist_name(ep))
    for name, plugin in plugins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
            dists[name] = (None, None)
    pm.check_pending()
    if _truthy("CURVPRUNE_TRACE_PLUGINS"):
        pm.add_hookcall_monitoring(_trace_before, _trace_after)
    return PluginHost(pm, dists)


def _core_version() -> str | None:
    try:
        return metadata.version("curvprune-core")
    except metadata.PackageNotFoundError:
        return None


def _trace_before(hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
    log.info("hook_called", hook=hook_name, plugins=[i.plugin_name for i in hook_impls])


def _trace_after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: Any) -> None:
    log.info("hook_returned", hook=hook_name)


@attrs.frozen
class PluginInfo:
    """What ``curvprune plugins`` shows for one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    components: tuple[Component, ...]


@final
class PluginHost:
    """Typed facade over the pluggy manager: the only code that calls ``pm.hook``.

    Args:
        pm: a plugin manager with curvprune's hookspecs and plugins registered.
        distributions: plugin name -> (distribution, version) for provenance.
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        distributions: dict[str, tuple[str | None, str | None]] | None = None,
    ) -> None:
        self.pm = pm
        self._dists = dict(distributions or {})
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        """The component registry (built on first use, then cached)."""
        if self._registry is None:
            self._registry = self.build_registry()
        return self._registry

    def build_registry(self) -> Registry:
        """Call every plugin's registration hooks, each with a ``register`` naming that plugin."""
        registry = Registry()
        for kind in KINDS.values():
            caller = getattr(self.pm.hook, kind.hook)
            for impl in caller.get_hookimpls():
                others = [p for p in self.pm.get_plugins() if p is not impl.plugin]
                only = self.pm.subset_hook_caller(kind.hook, remove_plugins=others)
                dist, version = self._dists.get(impl.plugin_name, (None, None))
                register = registry.registrar(kind.key, impl.plugin_name, dist, version)
                try:
                    only(register=register)
                except (TypeError, ValueError, ImportError) as exc:
                    if isinstance(exc, PluginLoadError):
                        raise
                    raise PluginLoadError(
                        f"plugin {impl.plugin_name!r} failed in {kind.hook}: {exc}"
                    ) from exc
        return registry

    def plugin_infos(self) -> list[PluginInfo]:
        """Every registered plugin with its distribution, hooks and components."""
        by_plugin: dict[str, list[Component]] = {}
        for comp in self.registry:
            by_plugin.setdefault(comp.plugin, []).append(comp)
        out = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            dist, version = self._dists.get(name, (None, None))
            hooks = tuple(sorted(h.name for h in self.pm.get_hookcallers(plugin) or ()))
            out.append(PluginInfo(name, dist, version, hooks, tuple(by_plugin.get(name, ()))))
        return out

    def installs(self) -> dict[str, str]:
        """Distribution → version of torch, curvprune-core and every registered plugin."""
        import torch

        out = {"torch": str(torch.__version__)}
        try:
            out["curvprune-core"] = metadata.version("curvprune-core")
        except metadata.PackageNotFoundError:
            out["curvprune-core"] = "unknown"
        for info in self.plugin_infos():
            out[info.distribution or f"plugin {info.name}"] = info.version or "unknown"
        return out

    def check_same_installs_across_ranks(self) -> None:
        """Refuse to start when the ranks of a torch.distributed job run different installs.

        One ``all_gather_object`` of :meth:`installs` (a no-op in one process): different
        plugin versions would build different estimators and scorers, which the per-step
        agreement check would only catch after the work.

        Raises:
            ConfigError: on every rank, naming the first difference.
        """
        from curvprune.tensors import distributed

        if not distributed.is_distributed():
            return
        import torch

        every: list[Any] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(every, self.installs())
        for rank, theirs in enumerate(every[1:], start=1):
            for name in sorted(set(every[0]) | set(theirs)):
                ours, other = every[0].get(name, "absent"), theirs.get(name, "absent")
                if ours != other:
                    raise ConfigError(
                        f"the ranks run different installs: {name} is {other} on rank {rank} "
                        f"but {ours} on rank 0; install the same versions everywhere @ plugins"
                    )

    # -- lifecycle hooks (typed) ------------------------------------------------------------
    def pipeline_start(self, pipeline: ObservedPipeline, model: nn.Module) -> None:
        """Call ``curvprune_pipeline_start``."""
        self._lifecycle("curvprune_pipeline_start", pipeline=pipeline, model=model)

    def after_prune_step(self, pipeline: ObservedPipeline, report: StepReport) -> None:
        """Call ``curvprune_after_prune_step``."""
        self._lifecycle("curvprune_after_prune_step", pipeline=pipeline, report=report)

    def pipeline_end(self, pipeline: ObservedPipeline, result: PruneResult) -> None:
        """Call ``curvprune_pipeline_end``."""
        self._lifecycle("curvprune_pipeline_end", pipeline=pipeline, result=result)

    def _lifecycle(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook; a plugin's exception becomes a one-line :class:`PluginHookError`.

        curvprune's own errors raised on purpose by a plugin pass through unchanged.

        Raises:
            PluginHookError: naming the plugin whose implementation raised, and the hook.
        """
        caller = getattr(self.pm.hook, hook)
        try:
            caller(**kwargs)
        except CurvpruneError:
            raise
        except Exception as exc:
            plugin = _raising_plugin(exc, caller.get_hookimpls())
            message = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise PluginHookError(f"plugin {plugin!r} failed in {hook}: {message}") from exc


def _raising_plugin(exc: BaseException, impls: Sequence[Any]) -> str:
    """The name of the plugin whose hook implementation is deepest in ``exc``'s traceback."""
    codes = {getattr(impl.function, "__code__", None): impl.plugin_name for impl in impls}
    name = "unknown"
    tb = exc.__traceback__
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code, name)
        tb = tb.tb_next
    return name
