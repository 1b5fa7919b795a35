"""Which components mix: every pairing of the matrix builds, and ``validate`` refuses the rest.

The full product {none, diagfisher, kfac, woodfisher, mfac static, mfac dynamic} × {magnitude,
obs, woodtaylor} × {oneshot, multi-step, gradual} × {global, layerwise, nm 2:4} is checked at
config level (no compute; examples/matrix/ holds one config per valid pairing, each run end to
end by tests/test_examples.py). Each invalid pairing is refused by ``curvprune validate`` in one line that says
why and where (examples/README.md lists them).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from curvprune import ConfigError, Pipeline, get_plugin_manager
from curvprune.cli import main

ESTIMATORS = {
    "none": None,
    "diagfisher": {"name": "diagfisher"},
    "kfac": {"name": "kfac"},
    "woodfisher": {"name": "woodfisher", "block_size": 16},
    "mfac-static": {"name": "mfac", "algorithm": "static"},
    "mfac-dynamic": {"name": "mfac", "algorithm": "dynamic"},
}
SCHEDULES = {
    "oneshot": {"name": "oneshot"},
    "multistep": {"name": "oneshot", "steps": 4},
    "gradual": {"name": "gradual", "start": 0, "end": 20, "frequency": 5},
}
MASKS = {"global": {"name": "global"}, "layerwise": {"name": "layerwise"},
         "nm24": {"name": "nm", "n_m": "2:4"}}


@pytest.fixture(scope="module")
def host():
    return get_plugin_manager()


def _config(estimator, scorer, schedule, mask):
    raw = {
        "prune": {"sparsity": 0.5},
        "scorer": {"name": scorer},
        "schedule": dict(SCHEDULES[schedule]),
        "mask": dict(MASKS[mask]),
    }
    if ESTIMATORS[estimator] is not None:
        raw["estimator"] = dict(ESTIMATORS[estimator])
    return raw


@pytest.mark.parametrize("estimator", list(ESTIMATORS))
def test_every_pairing_of_the_matrix_builds_or_says_why_not(host, estimator):
    for scorer, schedule, mask in itertools.product(("magnitude", "obs", "woodtaylor"),
                                                    SCHEDULES, MASKS):
        raw = _config(estimator, scorer, schedule, mask)
        if estimator == "none" and scorer != "magnitude":
            with pytest.raises(ConfigError, match=f"scorer '{scorer}' needs a curvature estimator"):
                Pipeline.from_config(raw, host=host)
            continue
        pipeline = Pipeline.from_config(raw, host=host)
        unused = estimator != "none" and scorer == "magnitude"
        assert bool(pipeline.warnings()) == unused, (estimator, scorer, pipeline.warnings())


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def _refused(tmp_path, capsys, text: str) -> str:
    assert main(["validate", str(_write(tmp_path, text))]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("curvprune validate: error: ") and " @ " in err, err
    return err


KFAC = '[estimator]\nname = "kfac"\n'
OBS = '[scorer]\nname = "obs"\n'

INVALID = {
    "obs without an estimator": (OBS, "scorer 'obs' needs a curvature estimator"),
    "woodtaylor without an estimator": (
        '[scorer]\nname = "woodtaylor"\n', "scorer 'woodtaylor' needs a curvature estimator"),
    "weight scorer with a channel mask": (
        KFAC + OBS + '[mask]\nname = "channel"\n',
        "scorer 'obs' scores single weights but mask 'channel' prunes channels"),
    "channel scorer with a weight mask": (
        '[scorer]\nname = "magnitude"\ngranularity = "channel"\n',
        "scorer 'magnitude' scores channels but mask 'global' prunes single weights"),
    "nm 2:4 at another sparsity": (
        '[prune]\nsparsity = 0.8\n[mask]\nname = "nm"\nn_m = "2:4"\n',
        "set prune.sparsity = 0.5 (got 0.8) @ prune.sparsity"),
    "gradual without fine-tuning epochs": (
        '[schedule]\nname = "gradual"\nend = 10\nfrequency = 5\n',
        "prunes during training but [finetune] epochs = 0"),
    "gradual starting above the target": (
        '[prune]\nsparsity = 0.5\n[schedule]\nname = "gradual"\nend = 10\nfrequency = 5\n'
        'initial_sparsity = 0.7\n[finetune]\nepochs = 1\n',
        "lower initial_sparsity @ schedule.initial_sparsity"),
    "kfac with joint obs": (
        KFAC + OBS + "joint = true\n", "kfac's blocks are whole layers"),
    "kfac with joint woodtaylor": (
        KFAC + '[scorer]\nname = "woodtaylor"\njoint = true\n', "kfac's blocks are whole layers"),
    "kfac with a block size": (
        KFAC + "block_size = 128\n" + OBS, "block_size must be unset for kfac"),
    "kfac with mini-batch gradients": (
        KFAC + "fisher_mini_batch = 32\n" + OBS, "fisher_mini_batch must be 1 for kfac"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_validate_refuses_an_invalid_pairing_in_one_line(tmp_path, capsys, case):
    text, fragment = INVALID[case]
    assert fragment in _refused(tmp_path, capsys, text)


def _registered(kind: str, name: str) -> bool:
    return name in get_plugin_manager().registry.names(kind)


@pytest.mark.skipif(not _registered("schedule", "greg"), reason="greg plugin not registered")
@pytest.mark.parametrize(("text", "fragment"), [
    ('[scorer]\nname = "obs"\n[estimator]\nname = "diagfisher"\n[schedule]\nname = "greg"\n'
     "[finetune]\nepochs = 1\n", "schedule 'greg' picks its groups by L1 magnitude"),
    ('[scorer]\nname = "magnitude"\ngranularity = "channel"\n[schedule]\nname = "greg"\n'
     '[mask]\nname = "global"\n[finetune]\nepochs = 1\n', "@ mask.name"),
])
def test_validate_refuses_greg_with_other_scorers_or_masks(tmp_path, capsys, text, fragment):
    assert fragment in _refused(tmp_path, capsys, text)


@pytest.mark.skipif(not _registered("scorer", "sosp-h"), reason="sosp plugin not registered")
@pytest.mark.parametrize("scorer", ["sosp-h", "sosp-i"])
def test_validate_refuses_sosp_with_a_weight_mask(tmp_path, capsys, scorer):
    err = _refused(tmp_path, capsys, f'[scorer]\nname = "{scorer}"\n[mask]\nname = "global"\n')
    assert f"scorer '{scorer}' scores channels but mask 'global' prunes single weights" in err


def test_validate_warns_about_an_estimator_nobody_uses(tmp_path, capsys):
    assert main(["validate", str(_write(tmp_path, KFAC + '[scorer]\nname = "magnitude"\n'))]) == 0
    out = capsys.readouterr().out
    assert "warning: estimator 'kfac' is configured but scorer 'magnitude' does not use" in out
