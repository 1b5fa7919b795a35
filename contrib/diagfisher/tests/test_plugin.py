"""The installed distribution is discovered through its entry point."""

from importlib.metadata import PackageNotFoundError, distribution

import pytest

import curvprune


def test_entry_point_registers_diagfisher():
    try:
        distribution("curvprune-diagfisher")
    except PackageNotFoundError:
        pytest.fail("curvprune-diagfisher is not installed: pip install -e contrib/diagfisher")
    host = curvprune.get_plugin_manager()
    component = host.registry.get("estimator", "diagfisher")
    assert component.plugin == "diagfisher"
    assert component.distribution == "curvprune-diagfisher"
    assert component.version == "0.1.0"


def test_created_by_name():
    from curvprune_diagfisher import DiagFisherEstimator

    assert isinstance(curvprune.create("estimator", "diagfisher", damping=1e-3),
                      DiagFisherEstimator)
