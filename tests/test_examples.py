"""Every example config runs end to end at a quick size, and the matrix holds every valid pairing.

The examples (examples/README.md) are the user-facing proof that the components mix: each one is
run through :func:`curvprune.run.execute.execute_run`, as ``curvprune run`` would, with its sizes shrunk
(one training epoch on the digits data, a few gradients, one fine-tuning epoch for gradual
schedules) but its components and their method options unchanged. All runs share one output
folder, so each dense model is trained once and reused from the run cache.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest

from curvprune import get_plugin_manager, load_raw_config
from curvprune.run.execute import execute_run

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"
EXAMPLES = sorted([*EXAMPLES_DIR.glob("*.toml"), *EXAMPLES_DIR.glob("matrix/*.toml")])
#: examples/matrix/<model>-<estimator>-<scorer>-<schedule>-<mask>.toml
MATRIX_NAME = re.compile(
    r"(?P<model>mlp|cnn)-(?P<estimator>[a-z]+)-(?P<scorer>[a-z0-9]+)-"
    r"(?P<schedule>oneshot|multistep|gradual)-(?P<mask>global|layerwise|nm24|channel)$"
)
#: Option overrides that keep a component's method but shrink its work (GReg's intervals).
QUICK_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("schedule", "greg"): {
        "update_reg_interval": 1, "reg_granularity_prune": 0.25, "reg_granularity_pick": 0.25,
        "reg_upper_limit_pick": 0.5, "stabilize_reg_interval": 2,
    },
}


def quick(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with its sizes shrunk for CI; components and their method options unchanged."""
    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    cfg["train"] = {"epochs": 1}  # the same for every example: one cached dense model per model
    cfg["data"] = {**cfg.get("data", {}), "batch_size": 128}
    cfg["prune"] = {**cfg.get("prune", {}), "loss_samples": 64}
    cfg["run"] = {**cfg.get("run", {}), "progress": False, "device": "cpu", "seed": 0}
    if "estimator" in cfg:
        est = cfg["estimator"]
        est["num_grads"] = min(int(est.get("num_grads", 32)), 32)
        if "fisher_mini_batch" in est:
            est["fisher_mini_batch"] = min(int(est["fisher_mini_batch"]), 4)
        if est.get("window") is not None:
            est["window"] = min(int(est["window"]), est["num_grads"])
    if "num_samples" in cfg.get("scorer", {}):  # SOSP: two batches, enough to check stability
        cfg["scorer"]["num_samples"] = min(int(cfg["scorer"]["num_samples"]), 256)
    schedule = cfg.setdefault("schedule", {"name": "oneshot"})
    epochs = 0  # one-shot examples skip fine-tuning here
    if schedule.get("name") == "gradual":  # 1 epoch of 11 steps: prune at steps 0, 4, 8
        schedule.update(start=0, end=8, frequency=4)
        epochs = 1
    elif schedule.get("name") == "greg":  # the pruning phase, then 1 epoch with masks held
        epochs = 1
    elif int(schedule.get("steps", 1)) > 1:
        schedule["steps"] = 2  # still multi-step: the curvature is refitted once in between
    cfg["finetune"] = {**cfg.get("finetune", {}), "epochs": epochs}
    for role in ("estimator", "scorer", "schedule", "mask"):
        if role in cfg:
            cfg[role].update(QUICK_OPTIONS.get((role, cfg[role].get("name", "")), {}))
    return cfg


def missing_components(raw: dict[str, Any]) -> list[str]:
    """Components the example names that no installed plugin registers."""
    registry = get_plugin_manager().registry
    missing = []
    for role in ("estimator", "scorer", "schedule", "mask"):
        name = raw.get(role, {}).get("name")
        if name and name not in registry.names(role):
            missing.append(f"{role} {name!r}")
    return missing


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One output folder for every example: dense models are trained once and cached there."""
    return tmp_path_factory.mktemp("examples")


def test_there_are_examples():
    assert len([p for p in EXAMPLES if p.parent.name == "matrix"]) == 99, [p.name for p in EXAMPLES]
    assert len(EXAMPLES) > 99


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_at_a_quick_size(path: Path, out_dir: Path) -> None:
    raw = load_raw_config(path)
    missing = missing_components(raw)
    if missing:
        pytest.skip(f"{', '.join(missing)} not registered (plugin not installed or not ready)")
    outcome = execute_run(quick(raw), out=out_dir, name=path.stem, quiet=True)
    result = json.loads((outcome.run_dir / "result.json").read_text())
    assert result == outcome.result
    target = result["sparsity"]["target"]
    assert target == raw["prune"]["sparsity"]
    # In the mask's own units: weights, N:M groups, or channels for structured masks.
    assert abs(result["sparsity"]["unit"] - target) < 0.01, result["sparsity"]
    assert result["methods"]["scorer"] == raw["scorer"]["name"]


def _matrix() -> list[dict[str, str]]:
    rows = []
    for path in EXAMPLES:
        match = MATRIX_NAME.fullmatch(path.stem)
        if path.parent.name == "matrix":
            assert match, f"{path.name} is not named <model>-<estimator>-<scorer>-<schedule>-<mask>"
            rows.append(match.groupdict())
    return rows


def test_matrix_names_say_what_the_config_holds():
    for path in EXAMPLES:
        match = MATRIX_NAME.fullmatch(path.stem)
        if not match:
            continue
        raw = load_raw_config(path)
        est = raw.get("estimator", {})
        est_name = est.get("name", "none") + (est.get("algorithm", "") if est.get("name") == "mfac" else "")
        assert est_name == match["estimator"], path.name
        assert raw["scorer"]["name"].replace("-", "") == match["scorer"], path.name
        steps = raw.get("schedule", {}).get("steps", 1)
        schedule = {"oneshot": "multistep" if steps > 1 else "oneshot"}.get(
            raw["schedule"]["name"], raw["schedule"]["name"])
        assert schedule == match["schedule"], path.name
        mask = {"nm": "nm24"}.get(raw["mask"]["name"], raw["mask"]["name"])
        assert mask == match["mask"], path.name
        assert raw["model"]["name"] == f"digits-{match['model']}", path.name


def test_matrix_holds_every_valid_pairing_once():
    """One file per valid pairing of estimator × scorer × schedule × mask (the model alternates).

    Valid: magnitude without an estimator, obs/woodtaylor with one (tests/test_pairings.py checks
    that the others are refused, or warned about for magnitude with an estimator).
    """
    rows = _matrix()
    got = sorted((r["estimator"], r["scorer"], r["schedule"], r["mask"]) for r in rows)
    estimators = ("none", "diagfisher", "kfac", "woodfisher", "mfacstatic", "mfacdynamic")
    expected = sorted(
        (e, sc, sh, m)
        for e, sc, sh, m in itertools.product(estimators, ("magnitude", "obs", "woodtaylor"),
                                              ("oneshot", "multistep", "gradual"),
                                              ("global", "layerwise", "nm24"))
        if (e == "none") == (sc == "magnitude")
    )
    assert got == expected
    # every pair of choices from two axes meets both models
    for a, b in itertools.combinations(("estimator", "scorer", "schedule", "mask"), 2):
        for x, y in {(r[a], r[b]) for r in rows}:
            assert {r["model"] for r in rows if r[a] == x and r[b] == y} == {"mlp", "cnn"}, (a, x, b, y)


def test_matrix_files_are_what_the_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("examples_generate", EXAMPLES_DIR / "generate.py")
    assert spec is not None and spec.loader is not None
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    expected = generate.expected_files()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in EXAMPLES_DIR.glob("matrix/*.toml")}
    assert sorted(on_disk) == sorted(expected), "run python examples/generate.py"
    stale = [name for name, text in expected.items() if on_disk[name] != text]
    assert not stale, f"run python examples/generate.py: {stale[:5]} differ"
    readme = (EXAMPLES_DIR / "README.md").read_text(encoding="utf-8")
    assert generate.readme_table() in readme, "run python examples/generate.py (README table)"


def test_readme_lists_every_example_and_links_resolve():
    readme = (EXAMPLES_DIR / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+\.toml)\)", readme)
    missing = [link for link in links if not (EXAMPLES_DIR / link).is_file()]
    assert not missing, f"examples/README.md links to missing files {missing}"
    unlisted = [p.name for p in EXAMPLES if p.name not in readme]
    assert not unlisted, f"examples/README.md does not mention {unlisted}"
