"""``curvprune compare``: seeds, failures, field-level disagreement, the table and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvprune.cli import main
from curvprune.errors import ConfigError
from curvprune.run.compare import SCHEMA, check_shared, summarize

BASE = """
[model]
name = "digits-mlp"
kwargs = {{ hidden = [32, 16] }}
[train]
epochs = 2
[prune]
sparsity = 0.5
loss_samples = 32
{extra}
[run]
progress = false
"""
OBS = """
[estimator]
name = "dense"
block_size = 32
damping = 1e-3
num_grads = 16
[scorer]
name = "obs"
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_seeds_failures_and_one_dense_model_per_seed(tmp_path, capsys):
    obs = write(tmp_path, "obs.toml", BASE.format(extra=OBS))
    mag = write(tmp_path, "mag.toml", BASE.format(extra=""))
    # fails mid-way: after the dense model is loaded, the memory plan refuses the run
    bad = write(tmp_path, "bad.toml", BASE.format(extra=OBS).replace(
        "progress = false", "progress = false\nmemory_limit_gb = 1e-9"))
    code = main(["compare", str(obs), str(mag), str(bad), "--out", str(tmp_path / "cmp"),
                 "--seeds", "2", "-q"])
    captured = capsys.readouterr()
    assert code == 1, "a failed run makes the exit code non-zero"
    assert "2 of 6 runs failed" in captured.err
    folder = next((tmp_path / "cmp").glob("compare-*"))
    payload = json.loads((folder / "comparison.json").read_text())
    assert payload["schema"] == SCHEMA and payload["seeds"] == [0, 1]
    runs = payload["runs"]
    assert [(r["label"], r["seed"], r["status"]) for r in runs] == [
        ("obs/dense/oneshot/global", 0, "ok"), ("obs/dense/oneshot/global", 1, "ok"),
        ("magnitude/oneshot/global", 0, "ok"), ("magnitude/oneshot/global", 1, "ok"),
        ("obs/dense/oneshot/global#2", 0, "failed"), ("obs/dense/oneshot/global#2", 1, "failed"),
    ]
    # one dense training per seed, everything else from the cache under <out>/cache
    assert [r.get("dense_source") for r in runs[:4]] == ["trained", "trained", "cache", "cache"]
    assert len(list((tmp_path / "cmp" / "cache").glob("dense-*.safetensors"))) == 2
    assert runs[0]["accuracy_dense"] == runs[2]["accuracy_dense"]
    assert runs[1]["accuracy_dense"] == runs[3]["accuracy_dense"]
    assert "MemoryPlanError" in runs[4]["error"] and "GiB" in runs[4]["error"]
    summary = {s["label"]: s for s in payload["summary"]}
    obs_row = summary["obs/dense/oneshot/global"]
    pruned = [r["accuracy_pruned"] for r in runs[:2]]
    assert obs_row["accuracy_pruned"] == pytest.approx(sum(pruned) / 2)
    assert obs_row["accuracy_pruned_std"] == pytest.approx(abs(pruned[0] - pruned[1]) / 2**0.5)
    assert summary["obs/dense/oneshot/global#2"]["failed"] == 2
    table = (folder / "comparison.md").read_text()
    assert "2 seeds per cell (mean ± standard deviation)" in table
    assert " ± " in table and "failed: MemoryPlanError" in table
    assert "## Accuracy vs sparsity" in table
    assert (folder / "accuracy_vs_sparsity.png").stat().st_size > 1000
    assert len(list((folder / "runs").iterdir())) == 4, "failed runs leave no run directory"


def test_disagreement_names_the_field_before_any_compute(tmp_path, capsys):
    a = write(tmp_path, "a.toml", BASE.format(extra=""))
    b = write(tmp_path, "b.toml", BASE.format(extra="").replace("epochs = 2", "epochs = 3"))
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "same [train]" in err and "train.epochs is 3 in" in err and err.endswith("@ train.epochs")
    assert not (tmp_path / "cmp").exists(), "nothing computed or written"


@pytest.mark.parametrize(
    ("change", "field"),
    [({"model": {"kwargs": {"hidden": [8]}}}, "model.kwargs.hidden"),
     ({"data": {"batch_size": 7}}, "data.batch_size"),
     ({"run": {"seed": 3}}, "run.seed")],
)
def test_check_shared_names_nested_fields(change, field):
    base = {"model": {"name": "m", "kwargs": {"hidden": [4]}}, "data": {"batch_size": 8},
            "train": {}, "run": {"seed": 0, "device": "cpu"}}
    other = json.loads(json.dumps(base))
    for table, values in change.items():
        other[table].update(values)
    with pytest.raises(ConfigError, match=rf"@ {field}$"):
        check_shared(["a", "b"], [base, other])
    check_shared(["a", "b"], [base, json.loads(json.dumps(base))])


def test_bad_seeds_and_sparsities(tmp_path, capsys):
    a = write(tmp_path, "a.toml", BASE.format(extra=""))
    assert main(["compare", str(a), "--seeds", "0", "--out", str(tmp_path / "c")]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    assert main(["compare", str(a), "--sparsities", "0.5,1.2", "--out", str(tmp_path / "c")]) == 2
    assert "sparsities must be in [0, 1)" in capsys.readouterr().err


def test_summary_of_a_single_seed_has_zero_std():
    rows = [{"label": "x", "target": 0.5, "status": "ok", "error": None, "sparsity": 0.5,
             "accuracy_pruned": 0.9}]
    (s,) = summarize(rows)
    assert s["accuracy_pruned"] == 0.9 and s["accuracy_pruned_std"] == 0.0
    assert s["accuracy_finetuned"] is None and s["failed"] == 0


def test_structured_rows_are_shown_against_remaining_flops(tmp_path):
    from curvprune.run.render import plot_accuracy_vs_sparsity, render_comparison

    def run(label, target, seed, acc, flops):
        return {"label": label, "target": target, "seed": seed, "status": "ok", "error": None,
                "sparsity": target, "flops_fraction": flops, "accuracy_dense": 0.99,
                "accuracy_pruned": acc, "accuracy_finetuned": None, "prune_seconds": 1.0,
                "peak_bytes": 2**20}

    rows = summarize([run("sosp-h", 0.5, 0, 0.9, 0.6), run("sosp-h", 0.5, 1, 0.8, 0.5),
                      run("l1", 0.5, 0, 0.7, 0.7), run("l1", 0.5, 1, 0.7, 0.7)])
    table = render_comparison(rows, seeds=2)
    assert "| FLOPs left |" in table
    assert "| sosp-h | 50.00 % | 50.00 ± 0.00 % | 55.00 ± 7.07 % |" in table
    plot_accuracy_vs_sparsity(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
