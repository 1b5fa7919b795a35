"""The installed distribution provides the ``mfac`` estimator through its entry point."""

import curvprune
from curvprune_mfac import MFACConfig, MFACEstimator


def test_installed_distribution_registers_mfac():
    host = curvprune.get_plugin_manager()
    component = host.registry.get("estimator", "mfac")
    assert component.distribution == "curvprune-mfac"
    assert component.factory is MFACEstimator and component.config is MFACConfig
    est = curvprune.create("estimator", "mfac", host=host, algorithm="dynamic", window=8)
    assert isinstance(est, MFACEstimator) and est.config.window_size == 8


def test_reference_defaults():
    cfg = MFACConfig()
    assert (cfg.damping, cfg.num_grads, cfg.fisher_mini_batch, cfg.block_size, cfg.algorithm,
            cfg.block_mode) == (1e-5, 64, 32, 128, "static", "alive")
    assert cfg.window_size == 64
