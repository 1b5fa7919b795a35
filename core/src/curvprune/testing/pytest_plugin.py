"""pytest plugin for plugin authors (load with ``-p curvprune.testing.pytest_plugin``).

torch runs single-threaded during tests (``CURVPRUNE_TEST_THREADS`` overrides that).

Hypothesis profiles:

* ``dev`` (default): few examples, no deadline (torch's first calls are slow).
* ``ci``: extends Hypothesis' built-in ``ci`` profile (derandomized, no database, blobs printed)
  with more examples; selected when ``CI`` is set, or by ``HYPOTHESIS_PROFILE``.

Fixtures:

* ``plugin_host``: a fresh :func:`curvprune.get_plugin_manager`.
* ``fake_dist``: installs a distribution on disk (``*.dist-info`` with ``METADATA`` and
  ``entry_points.txt``, plus the plugin module) on ``sys.path``, so that ``importlib.metadata``
  really discovers it; ``sys.path`` and ``sys.modules`` are restored afterwards.
* ``hook_recorder``: records every hook call ``(hook_name, kwargs)`` made through
  ``plugin_host``, built on :meth:`pluggy.PluginManager.add_hookcall_monitoring`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pluggy
import pytest
from hypothesis import HealthCheck, settings

import curvprune
from curvprune import PluginHost

__all__ = ["FakeDist", "HookRecorder", "fake_dist", "hook_recorder", "plugin_host"]

def pytest_configure(config: pytest.Config) -> None:
    """Run torch single-threaded unless ``CURVPRUNE_TEST_THREADS`` says otherwise.

    Tests use tiny tensors, where intra-op threads only add overhead, and on a shared machine
    batched small-matrix LAPACK calls with 2 threads run several times slower than with 1.
    """
    import torch

    torch.set_num_threads(int(os.environ.get("CURVPRUNE_TEST_THREADS", "1")))
    config.addinivalue_line("markers", "gpu: needs CUDA; deselected automatically without it")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` run only where ``torch.cuda.is_available()``."""
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if item.get_closest_marker("gpu") is None]


settings.register_profile("dev", max_examples=20, deadline=None)
settings.register_profile(
    "ci",
    settings.get_profile("ci"),
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.fixture
def plugin_host() -> PluginHost:
    """A fresh plugin host: builtins plus the installed plugins (honours the env switches)."""
    return curvprune.get_plugin_manager()


# ------------------------------------------------------------------------------------------------
# fake_dist
# ------------------------------------------------------------------------------------------------
class FakeDist:
    """Writes distributions with a ``curvprune`` entry point under a folder put on ``sys.path``.

    Call it as ``fake_dist(dist_name, ep_name, module_source, version="0.1")``; see
    :meth:`__call__`.
    """

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self._root = root
        self._monkeypatch = monkeypatch
        self._count = 0

    def __call__(
        self,
        dist_name: str,
        ep_name: str,
        module_source: str | None,
        version: str = "0.1",
        *,
        module: str | None = None,
        group: str = "curvprune",
    ) -> str:
        """Install a fake distribution and return its name.

        Args:
            dist_name: the distribution name (``METADATA`` ``Name``), e.g. ``curvprune-foo``.
            ep_name: the entry-point name (the plugin name).
            module_source: source of the plugin module (dedented), or None when the entry
                point's target is already importable (e.g. a plugin under test in a source tree).
            version: the distribution version.
            module: the entry point's target module; default ``<dist_name>_plugin`` with
                dashes and dots as underscores.
            group: the entry-point group.

        Returns:
            ``dist_name``.
        """
        stem = re.sub(r"[-_.]+", "_", dist_name).lower()
        if module_source is None and module is None:
            raise ValueError("fake_dist: module_source is None, so pass module= (the importable "
                             "entry-point target)")
        module = module or f"{stem}_plugin"
        self._count += 1
        site = self._root / f"site-{self._count}"
        info = site / f"{stem}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: {version}\n", encoding="utf-8"
        )
        (info / "entry_points.txt").write_text(f"[{group}]\n{ep_name} = {module}\n",
                                               encoding="utf-8")
        if module_source is not None:
            target = site.joinpath(*module.split(".")).with_suffix(".py")
            target.parent.mkdir(parents=True, exist_ok=True)
            for package in list(target.parents)[: module.count(".")]:
                (package / "__init__.py").touch()
            target.write_text(textwrap.dedent(module_source), encoding="utf-8")
        self._monkeypatch.syspath_prepend(str(site))  # also invalidates import caches
        return dist_name


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDist]:
    """Install fake distributions for one test; ``sys.path`` and ``sys.modules`` are restored.

    Example::

        def test_found(fake_dist):
            fake_dist("curvprune-foo", "foo", '''
                from curvprune import hookimpl
                @hookimpl
                def curvprune_register_saliency_scorers(register): ...
            ''')
            host = curvprune.get_plugin_manager()
            assert host.pm.has_plugin("foo")
    """
    before = set(sys.modules)
    yield FakeDist(tmp_path / "fake-dists", monkeypatch)
    for name in set(sys.modules) - before:
        del sys.modules[name]
    importlib.invalidate_caches()


# ------------------------------------------------------------------------------------------------
# hook_recorder
# ------------------------------------------------------------------------------------------------
class HookRecorder:
    """Records hook calls ``(hook_name, kwargs)`` on one or more plugin managers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._undo: list[Callable[[], None]] = []

    def attach(self, host: PluginHost | pluggy.PluginManager) -> HookRecorder:
        """Start recording the calls made through ``host`` (a host or its pluggy manager)."""
        pm = host.pm if isinstance(host, PluginHost) else host

        def before(hook_name: str, hook_impls: Sequence[Any], kwargs: dict[str, Any]) -> None:
            self.calls.append((hook_name, dict(kwargs)))

        def after(outcome: Any, hook_name: str, hook_impls: Sequence[Any], kwargs: Any) -> None:
            return None

        self._undo.append(pm.add_hookcall_monitoring(before, after))
        return self

    def names(self) -> list[str]:
        """The names of the recorded hooks, in call order."""
        return [name for name, _ in self.calls]

    def kwargs_of(self, hook_name: str) -> list[dict[str, Any]]:
        """The keyword arguments of every recorded call of ``hook_name``."""
        return [kwargs for name, kwargs in self.calls if name == hook_name]

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        self.calls.clear()

    def detach(self) -> None:
        """Stop recording everywhere."""
        while self._undo:
            self._undo.pop()()


@pytest.fixture
def hook_recorder(plugin_host: PluginHost) -> Iterator[HookRecorder]:
    """A :class:`HookRecorder` attached to ``plugin_host`` (``.attach()`` adds other hosts)."""
    recorder = HookRecorder().attach(plugin_host)
    yield recorder
    recorder.detach()
