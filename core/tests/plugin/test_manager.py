"""The plugin manager: entry-point discovery through real (fake) distributions, blocking,
broken and duplicate plugins, misspelt hooks."""

import pluggy
import pytest

import curvprune
from curvprune.testing.dense import DenseEstimator

_PLUGIN = """
    from curvprune import EstimatorConfig, hookimpl
    from curvprune.testing.dense import DenseEstimator

    class KitEstimator(DenseEstimator):
        pass

    @hookimpl
    def curvprune_register_curvature_estimators(register):
        register("{name}", KitEstimator, config=EstimatorConfig)
"""


def test_fake_dist_is_discovered_with_its_distribution(fake_dist):
    fake_dist("curvprune-kitdemo", "kitdemo", _PLUGIN.format(name="kit-dense"), version="1.2")
    host = curvprune.get_plugin_manager()
    assert host.pm.has_plugin("kitdemo")
    component = host.registry.get("estimator", "kit-dense")
    assert (component.plugin, component.distribution, component.version) == (
        "kitdemo", "curvprune-kitdemo", "1.2"
    )
    assert isinstance(curvprune.create("estimator", "kit-dense", host=host), DenseEstimator)


def test_plugins_are_blocked_by_name_and_by_environment(fake_dist, monkeypatch):
    fake_dist("curvprune-kitdemo", "kitdemo", _PLUGIN.format(name="kit-dense"))
    blocked = curvprune.get_plugin_manager(blocked=["kitdemo"])
    assert not blocked.pm.has_plugin("kitdemo")
    assert ("estimator", "kit-dense") not in blocked.registry
    monkeypatch.setenv("CURVPRUNE_DISABLE_PLUGINS", "builtin.scorers, kitdemo")
    by_env = curvprune.get_plugin_manager()
    assert not by_env.pm.has_plugin("kitdemo") and not by_env.pm.has_plugin("builtin.scorers")
    assert not {"magnitude", "obs"} & set(by_env.registry.names("scorer"))


def test_a_broken_plugin_names_itself_and_its_distribution(fake_dist):
    fake_dist("curvprune-kitbroken", "kitbroken", "import curvprune_no_such_module\n",
              version="0.3")
    with pytest.raises(curvprune.PluginLoadError) as info:
        curvprune.get_plugin_manager()
    message = str(info.value)
    assert "'kitbroken'" in message and "curvprune-kitbroken 0.3" in message
    assert "curvprune_no_such_module" in message
    assert "CURVPRUNE_DISABLE_PLUGINS=kitbroken" in message


def test_two_distributions_with_one_entry_point_name_raise(fake_dist):
    fake_dist("curvprune-kit-one", "kitdup", _PLUGIN.format(name="kit-one"))
    fake_dist("curvprune-kit-two", "kitdup", _PLUGIN.format(name="kit-two"))
    with pytest.raises(curvprune.DuplicatePluginError, match="kitdup") as info:
        curvprune.get_plugin_manager()
    assert "curvprune-kit-one" in str(info.value) and "curvprune-kit-two" in str(info.value)


def test_a_misspelt_hook_is_caught_by_check_pending(fake_dist):
    fake_dist("curvprune-kittypo", "kittypo", """
        from curvprune import hookimpl

        @hookimpl
        def curvprune_register_curvature_estimator(register):
            pass
    """)
    with pytest.raises(pluggy.PluginValidationError, match="register_curvature_estimator'"):
        curvprune.get_plugin_manager()


