"""The installed distribution provides the components through its entry point."""

from __future__ import annotations

from importlib.metadata import distribution, entry_points

import pytest

import curvprune
from curvprune_woodfisher import (
    WoodFisherConfig,
    WoodFisherEstimator,
    WoodTaylorConfig,
    WoodTaylorScorer,
    plugin,
)


@pytest.fixture(scope="module")
def host() -> curvprune.PluginHost:
    # Load installed plugins from entry points, blocking the other distributions' plugins so a
    # half-installed neighbour cannot fail this test.
    others = {ep.name for ep in entry_points(group="curvprune")} - {"woodfisher"}
    return curvprune.get_plugin_manager(autoload=True, blocked=others)


def test_entry_point_is_declared() -> None:
    (ep,) = [ep for ep in entry_points(group="curvprune") if ep.name == "woodfisher"]
    assert ep.value == "curvprune_woodfisher.plugin"
    assert ep.dist is not None and ep.dist.metadata["Name"] == "curvprune-woodfisher"
    assert distribution("curvprune-woodfisher").version == curvprune.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("kind", "name", "factory", "config"),
    [("estimator", "woodfisher", WoodFisherEstimator, WoodFisherConfig),
     ("scorer", "woodtaylor", WoodTaylorScorer, WoodTaylorConfig)],
)
def test_installed_distribution_provides(host, kind, name, factory, config) -> None:
    component = host.registry.get(kind, name)
    assert component.distribution == "curvprune-woodfisher"
    assert component.version == "0.1.0"
    assert component.plugin == "woodfisher"
    assert component.factory is factory and component.config is config
    built = curvprune.create(kind, name, host=host)
    assert isinstance(built, factory) and built.config == config()


def test_plugin_module_holds_only_registration_hooks() -> None:
    public = [n for n in vars(plugin) if n.startswith("curvprune_")]
    assert sorted(public) == ["curvprune_register_curvature_estimators",
                              "curvprune_register_saliency_scorers"]
    assert all(hasattr(getattr(plugin, n), "curvprune_impl") for n in public)


def test_plugin_imports_only_the_public_api() -> None:
    import ast
    from pathlib import Path

    import curvprune_woodfisher

    for path in Path(curvprune_woodfisher.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("curvprune."), f"{path.name}: {node.module}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("curvprune.") for a in node.names), path.name
