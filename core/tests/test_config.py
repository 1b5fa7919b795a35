"""Config files: structuring, one-line errors with paths and hints, round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import curvprune
from curvprune import ConfigError
from curvprune.config import (
    PipelineConfig,
    dump_config,
    load_raw_config,
    structure_config,
    unstructure_config,
)


@pytest.fixture(scope="module")
def registry():
    return curvprune.get_plugin_manager(autoload=False).registry


def errors_of(raw, registry):
    with pytest.raises(ConfigError) as info:
        structure_config(raw, registry)
    return info.value.errors


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"estimator": {"name": "dense", "dampng": 1e-3}},
         "unknown key 'dampng' (did you mean 'damping'?) @ estimator"),
        ({"estimator": {"name": "dense", "damping": -1}}, "damping must be > 0, got -1.0 @ estimator.damping"),
        ({"estimator": {"name": "dense", "block_size": 0}}, "block_size must be >= 1, got 0 @ estimator.block_size"),
        ({"estimator": {"name": "densee"}},
         "no curvature estimator 'densee' (installed: dense); did you mean 'dense'? @ estimator.name"),
        ({"scorer": {"name": "obss"}}, "did you mean 'obs'? @ scorer.name"),
        ({"prune": {"sparsity": 1.0}}, "sparsity must be in [0, 1), got 1.0 @ prune.sparsity"),
        ({"prune": {"sparsity": -0.1}}, "sparsity must be in [0, 1), got -0.1 @ prune.sparsity"),
        ({"prune": {"sparsity": "0.5"}}, "expected a number, got '0.5' @ prune.sparsity"),
        ({"train": {"epochs": 2.5}}, "expected an integer, got 2.5 @ train.epochs"),
        ({"estimater": {"name": "dense"}}, "unknown table [estimater] (did you mean [estimator]?) @ estimater"),
        ({"scorer": {"name": "magnitude", "granularity": "chanel"}},
         "must be one of 'weight', 'channel', got 'chanel'; did you mean 'channel'? @ scorer.granularity"),
        ({"scorer": {"granularity": "weight"}}, "missing 'name' (installed: magnitude, obs"),
        ({"prune": {"targets": "Linear"}}, "@ prune.targets"),
        ({"prune": []}, "[prune] must be a table"),
    ],
)
def test_each_error_is_one_line_with_path_and_hint(raw, expected, registry):
    errors = errors_of(raw, registry)
    assert any(expected in e for e in errors), errors
    assert all("\n" not in e and " @ " in e for e in errors)


def test_all_problems_of_a_file_are_reported_together(registry):
    errors = errors_of(
        {"prune": {"sparsity": 2.0}, "estimator": {"name": "dense", "dampng": 1}, "typo": {}},
        registry,
    )
    assert len(errors) == 3


def test_defaults_fill_missing_tables(registry):
    cfg = structure_config({}, registry)
    assert cfg.scorer.name == "magnitude" and cfg.schedule.name == "oneshot"
    assert cfg.mask.name == "global" and cfg.estimator is None
    assert cfg.prune.targets == ("Conv2d", "Linear", "Conv1D")


def test_toml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[prune]\nsparsity = \n")
    with pytest.raises(ConfigError, match=r"TOML syntax error: .*line 2.* @ .*bad\.toml"):
        load_raw_config(path)


def test_not_utf8_is_a_config_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes("[model]\nname = 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_raw_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_raw_config(tmp_path / "nope.toml")


def test_json_configs(tmp_path, registry):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"prune": {"sparsity": 0.3}, "scorer": {"name": "obs"},
                                "estimator": {"name": "dense"}}))
    cfg = structure_config(load_raw_config(path), registry)
    assert cfg.prune.sparsity == 0.3 and cfg.scorer.name == "obs"


@settings(max_examples=30)
@given(
    sparsity=st.floats(0, 0.99),
    damping=st.floats(1e-8, 1e3),
    block_size=st.one_of(st.none(), st.integers(1, 4096)),
    num_grads=st.integers(1, 10_000),
    steps=st.integers(1, 16),
    targets=st.lists(st.sampled_from(["Conv2d", "Linear", "re:.*weight"]), min_size=1, max_size=3),
    joint=st.booleans(),
)
def test_round_trip_through_toml(sparsity, damping, block_size, num_grads, steps, targets, joint):
    registry = curvprune.get_plugin_manager(autoload=False).registry
    raw = {
        "prune": {"sparsity": sparsity, "targets": targets},
        "estimator": {"name": "dense", "damping": damping, "num_grads": num_grads},
        "scorer": {"name": "obs", "joint": joint},
        "schedule": {"name": "oneshot", "steps": steps},
    }
    if block_size is not None:
        raw["estimator"]["block_size"] = block_size
    cfg = structure_config(raw, registry)
    import tomllib

    again = structure_config(tomllib.loads(dump_config(cfg)), registry)
    assert again == cfg
    assert structure_config(unstructure_config(cfg), registry) == cfg
    assert isinstance(cfg, PipelineConfig)


def test_create_validates_options():
    with pytest.raises(ConfigError, match=r"unknown key 'jont' \(did you mean 'joint'\?\)"):
        curvprune.create("scorer", "obs", jont=True)
    with pytest.raises(ValueError, match="unknown kind"):
        curvprune.create("estimators", "dense")
    est = curvprune.create("estimator", "dense", damping=1e-3)
    assert est.config.damping == 1e-3
