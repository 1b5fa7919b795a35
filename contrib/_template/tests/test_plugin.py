"""curvprune discovers this plugin through the entry point declared in ../pyproject.toml.

Installed (``pip install -e .``), the real distribution is found; merely copied, ``fake_dist``
declares the same entry point from a fake distribution, so discovery is checked either way.
"""

import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import curvprune

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROJECT = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
DIST = PROJECT["name"]
[(PLUGIN, TARGET)] = PROJECT["entry-points"]["curvprune"].items()
COMPONENTS = {"estimator": ["isotropic"]}  # what plugin.py registers


def _installed() -> bool:
    try:
        distribution(DIST)
    except PackageNotFoundError:
        return False
    return True


def test_entry_point_is_discovered(fake_dist):
    if not _installed():
        fake_dist(DIST, PLUGIN, None, version=PROJECT["version"], module=TARGET)
    host = curvprune.get_plugin_manager()
    assert host.pm.has_plugin(PLUGIN), f"entry point {PLUGIN!r} of {DIST} was not loaded"
    for kind, names in COMPONENTS.items():
        for name in names:
            component = host.registry.get(kind, name)
            assert (component.plugin, component.distribution) == (PLUGIN, DIST)
            assert component.version == PROJECT["version"]
