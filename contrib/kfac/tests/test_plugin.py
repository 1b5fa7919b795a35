"""The installed distribution is discovered through its entry point."""

from importlib.metadata import PackageNotFoundError, distribution, requires

import pytest

import curvprune


def test_entry_point_registers_kfac():
    try:
        distribution("curvprune-kfac")
    except PackageNotFoundError:
        pytest.fail("curvprune-kfac is not installed: pip install -e contrib/kfac")
    host = curvprune.get_plugin_manager()
    component = host.registry.get("estimator", "kfac")
    assert component.plugin == "kfac"
    assert component.distribution == "curvprune-kfac"
    assert component.version == "0.1.0"


def test_curvlinops_is_pinned():
    assert "curvlinops-for-pytorch==3.0.1" in (requires("curvprune-kfac") or [])
    assert distribution("curvlinops-for-pytorch").version == "3.0.1"


def test_created_by_name():
    from curvprune_kfac import KFACEstimator

    est = curvprune.create("estimator", "kfac", damping=1e-3)
    assert isinstance(est, KFACEstimator) and est.fits_model
