"""The installed distribution provides the scorers through its entry point."""

from __future__ import annotations

from importlib.metadata import distribution, entry_points

import pytest

import curvprune
from curvprune_sosp import SospHConfig, SospHScorer, SospIConfig, SospIScorer, plugin


@pytest.fixture(scope="module")
def host() -> curvprune.PluginHost:
    others = {ep.name for ep in entry_points(group="curvprune")} - {"sosp"}
    return curvprune.get_plugin_manager(autoload=True, blocked=others)


def test_entry_point_is_declared() -> None:
    (ep,) = [ep for ep in entry_points(group="curvprune") if ep.name == "sosp"]
    assert ep.value == "curvprune_sosp.plugin"
    assert ep.dist is not None and ep.dist.metadata["Name"] == "curvprune-sosp"
    assert distribution("curvprune-sosp").version == curvprune.__version__ == "0.1.0"


@pytest.mark.parametrize(
    ("name", "factory", "config"),
    [("sosp-h", SospHScorer, SospHConfig), ("sosp-i", SospIScorer, SospIConfig)],
)
def test_installed_distribution_provides(host, name, factory, config) -> None:
    component = host.registry.get("scorer", name)
    assert component.distribution == "curvprune-sosp"
    assert component.plugin == "sosp"
    assert component.factory is factory and component.config is config
    built = curvprune.create("scorer", name, host=host)
    assert isinstance(built, factory) and built.config == config()
    assert built.granularity == "channel" and built.needs_data


def test_plugin_module_holds_only_hooks() -> None:
    public = [n for n in vars(plugin) if n.startswith("curvprune_")]
    assert sorted(public) == ["curvprune_pipeline_end", "curvprune_register_saliency_scorers"]
    assert all(hasattr(getattr(plugin, n), "curvprune_impl") for n in public)


def test_bad_options_name_the_field(host) -> None:
    with pytest.raises(curvprune.ConfigError, match="num_samples"):
        curvprune.Pipeline.from_config(
            {"prune": {"sparsity": 0.5}, "scorer": {"name": "sosp-h", "num_samples": 0},
             "mask": {"name": "channel"}}, host=host)
    with pytest.raises(curvprune.ConfigError, match="jacobian"):
        curvprune.Pipeline.from_config(
            {"prune": {"sparsity": 0.5}, "scorer": {"name": "sosp-i", "jacobian": "sideways"},
             "mask": {"name": "channel"}}, host=host)
