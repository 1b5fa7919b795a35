"""The installed distribution registers ``greg``; the core's schedule contract holds for it."""

import pytest
import torch

import curvprune
from curvprune.testing.contracts import SchedulerContract
from curvprune_greg import GRegConfig, GRegSchedule, plugin


def test_installed_distribution_registers_greg():
    host = curvprune.get_plugin_manager()
    component = host.registry.get("schedule", "greg")
    assert component.distribution == "curvprune-greg"
    assert component.factory is GRegSchedule and component.config is GRegConfig
    schedule = curvprune.create("schedule", "greg", host=host, variant=2)
    assert isinstance(schedule, GRegSchedule) and schedule.config.variant == 2


def test_reference_defaults():
    """memo §1.8: the reference code's defaults (its ImageNet settings)."""
    cfg = GRegConfig()
    assert (cfg.variant, cfg.granularity, cfg.update_reg_interval, cfg.reg_granularity_prune,
            cfg.reg_upper_limit, cfg.mag_ratio_limit, cfg.stabilize_reg_interval,
            cfg.reg_granularity_pick, cfg.reg_upper_limit_pick, cfg.reg_granularity_recover,
            cfg.lr_prune, cfg.momentum, cfg.weight_decay, cfg.residual, cfg.reg_affine) == (
        1, "filter", 5, 1e-4, 1.0, 1000.0, 40000, 1e-5, 1e-2, -1e-4, 1e-3, 0.9, 1e-4,
        "internal", False)


def test_max_steps_with_reference_defaults():
    """GReg-1: 10 001 updates (10 001·1e-4 > 1) every 5 steps, then 40 000 held, + the removal step."""
    assert GRegSchedule().max_steps() == 10_000 * 5 + 40_000 + 1
    # GReg-2: 1000 picks to 1e-2, then 9901 updates to exceed 1 (0.01 + 9901·1e-4 > 1).
    assert GRegSchedule(GRegConfig(variant=2)).max_steps() == (1000 + 9901 - 1) * 5 + 40_000 + 1


@pytest.mark.parametrize(("options", "message"), [
    ({"reg_upper_limit": 0}, "reg_upper_limit must be > 0"),
    ({"reg_upper_limit": -1}, "reg_upper_limit must be > 0"),
    ({"ratios": {"fc": 1.0}}, "ratios must map selectors to pruning ratios in [0, 1)"),
    ({"ratios": {"fc": -0.1}}, "ratios must map selectors to pruning ratios in [0, 1)"),
    ({"ratios": {"re:(": 0.5}}, "invalid regex"),
    ({"variant": 3}, "variant"),
    ({"granularity": "row"}, "granularity"),
    ({"granularity": "weight", "reg_affine": True}, "reg_affine needs granularity = 'filter'"),
    ({"variant": 2, "reg_upper_limit_pick": 2.0}, "reg_upper_limit_pick must be below"),
])
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(curvprune.ConfigError) as info:
        curvprune.Pipeline.from_config({
            "scorer": {"name": "magnitude", "granularity": "channel"},
            "schedule": {"name": "greg", **options}, "mask": {"name": "channel"}})
    assert message in str(info.value) and "@ schedule" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("tables", "message"), [
    ({"scorer": {"name": "obs"}, "estimator": {"name": "diagfisher"}}, "set [scorer] name = 'magnitude'"),
    ({"scorer": {"name": "magnitude"}, "mask": {"name": "global"}}, "use [mask] name = 'channel'"),
    ({"scorer": {"name": "magnitude"}, "mask": {"name": "nm"}, "schedule": {
        "name": "greg", "granularity": "weight"}, "prune": {"sparsity": 0.5}},
     "use [mask] name = 'layerwise' or 'global'"),
])
def test_pipeline_combination_checks(tables, message):
    config = {"scorer": {"name": "magnitude", "granularity": "channel", "norm": "l1"},
              "schedule": {"name": "greg"}, "mask": {"name": "channel"}, **tables}
    with pytest.raises(curvprune.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        curvprune.Pipeline.from_config(config)


class TestGRegContract(SchedulerContract):
    name = "greg"
    plugins = (("greg", plugin),)


def test_one_shot_prune_refuses_greg_and_points_to_the_prune_phase():
    pipeline = curvprune.Pipeline.from_config({
        "scorer": {"name": "magnitude", "granularity": "channel"},
        "schedule": {"name": "greg"}, "mask": {"name": "channel"}})
    assert pipeline.schedule.during_training and pipeline.schedule.prune_phase
    with pytest.raises(curvprune.ConfigError, match="which gives it a prune phase"):
        pipeline.prune(torch.nn.Linear(2, 2), None)
