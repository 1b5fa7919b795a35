"""``curvprune export`` and ``curvprune.load_pruned``: round trips into fresh models (issue 8.3)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import curvprune
from curvprune.cli import main
from curvprune.errors import ConfigError
from curvprune.run.execute import execute_run
from curvprune.run.export import export_run
from curvprune.run.models import build_model

CONFIG = """
[model]
name = "{model}"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.7
loss_samples = 0
[estimator]
name = "dense"
block_size = 16
damping = 1e-3
num_grads = 16
[scorer]
name = "obs"
[run]
progress = false
"""


@pytest.fixture(scope="module", params=["digits-mlp", "digits-cnn"])
def run_dir(request, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export")
    cfg = folder / "c.toml"
    cfg.write_text(CONFIG.format(model=request.param))
    return execute_run(cfg, out=folder / "runs", name="r", quiet=True).run_dir


def digits(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def run_model(run_dir: Path) -> torch.nn.Module:
    """The pruned model as the run left it, rebuilt by hand from its own files."""
    record = json.loads((run_dir / "result.json").read_text())
    model = build_model(record["model"]["name"], num_classes=10)
    model.load_state_dict(load_file(str(run_dir / "model.safetensors")))
    return model.eval()


def test_export_round_trip_into_a_fresh_model_reproduces_the_outputs(run_dir, tmp_path):
    folder = export_run(run_dir, tmp_path / "exp")
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json", "masks.safetensors", "model.safetensors"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "masked" and set(manifest["files"]) == {
        "model.safetensors", "masks.safetensors"}
    name = manifest["model"]["name"]
    fresh = curvprune.load_pruned(folder, build_model(name, num_classes=10))
    with torch.no_grad():
        assert torch.equal(fresh(digits()), run_model(run_dir)(digits()))
    # the dense model with zeros: every masked weight is exactly zero, the sparsity as recorded
    masks = load_file(str(folder / "masks.safetensors"))
    params = dict(fresh.named_parameters())
    removed = sum(int((m == 0).sum()) for m in masks.values())
    assert all(bool((params[k][m == 0] == 0).all()) for k, m in masks.items())
    assert removed / sum(m.numel() for m in masks.values()) == pytest.approx(
        manifest["sparsity"]["total"], abs=1e-6)


def test_load_pruned_reads_a_run_directory_too(run_dir):
    name = json.loads((run_dir / "result.json").read_text())["model"]["name"]
    model = curvprune.load_pruned(run_dir, build_model(name, num_classes=10))
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(digits()), run_model(run_dir)(digits()))


def test_load_pruned_refuses_another_architecture_and_leaves_it_untouched(run_dir):
    other = build_model("digits-mlp", num_classes=7)  # other keys (CNN run) or shapes (MLP run)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError, match=r"do not fit Digits(MLP|CNN) .* @ "):
        curvprune.load_pruned(run_dir, other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_export_refuses_weights_that_are_not_zero_where_masked(run_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in run_dir.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    state = load_file(str(broken / "model.safetensors"))
    name = next(iter(load_file(str(broken / "masks.safetensors"))))
    state[name] = state[name] + 1.0
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match=f"weights of '{name}' are not zero where masked"):
        export_run(broken)
    assert not (broken / "export").exists()


def test_export_of_a_truncated_file_is_one_line(run_dir, tmp_path, capsys):
    broken = tmp_path / "trunc"
    broken.mkdir()
    for f in ("result.json", "masks.safetensors"):
        (broken / f).write_bytes((run_dir / f).read_bytes())
    (broken / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:64])
    assert main(["export", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.safetensors is truncated or corrupt" in err
    assert not (broken / "export").exists()


def test_cli_export_twice_refuses_to_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    first = (out / "model.safetensors").read_bytes()
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    assert "export folder exists already" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first


REMOVAL = """
[model]
name = "digits-cnn"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.5
loss_samples = 0
[scorer]
name = "magnitude"
granularity = "channel"
[mask]
name = "channel"
remove = true
[run]
progress = false
"""


def test_export_of_a_physically_smaller_model(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(REMOVAL)
    run = execute_run(cfg, out=tmp_path / "runs", name="r", quiet=True).run_dir
    folder = export_run(run, onnx=True)
    assert (folder / "structure.json").read_bytes() != b""
    onnx_check = json.loads((folder / "manifest.json").read_text())["onnx"]
    assert onnx_check["file"] == "model.onnx" and (folder / "model.onnx").stat().st_size > 0
    assert onnx_check["max_abs_difference"] <= onnx_check["tolerance"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["kind"] == "removed" and "structure.json" in manifest["files"]
    full = build_model("digits-cnn", num_classes=10)
    dense_params = sum(p.numel() for p in full.parameters())
    small = curvprune.load_pruned(folder, full)
    record = json.loads((run / "result.json").read_text())
    assert sum(p.numel() for p in small.parameters()) < dense_params
    conv_linear = [m for m in small.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    counted = sum(p.numel() for m in conv_linear for p in m.parameters(recurse=False))
    assert counted == record["structure"]["params_after"]  # Conv and Linear weights and biases
    for latency in (record["structure"]["latency"], manifest["latency"]):  # run and export
        assert set(latency["batch_sizes"]) == {"1", "32"} and latency["threads"] >= 1
        for figures in latency["batch_sizes"].values():
            assert figures["dense_ms"] > 0 and figures["pruned_ms"] > 0
            assert figures["speedup"] == pytest.approx(figures["dense_ms"] / figures["pruned_ms"])
    report = (run / "report.md").read_text()
    assert "Measured inference latency" in report
    assert "| target (channel structures) | structures removed | parameters cut | FLOPs cut |" in report
    reference = curvprune.load_pruned(run, build_model("digits-cnn", num_classes=10))
    with torch.no_grad():
        assert torch.equal(small(digits()), reference(digits()))
    # a model of the wrong architecture is refused and left whole
    other = build_model("digits-cnn", num_classes=7)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ConfigError):
        curvprune.load_pruned(folder, other)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and after.keys() == before.keys()


def test_onnx_export_without_the_extra_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text(REMOVAL)
    run = execute_run(cfg, out=tmp_path / "runs", name="r", quiet=True).run_dir
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r'needs the onnx extra.*@ export --onnx$'):
        export_run(run, tmp_path / "out", onnx=True)
    assert not (tmp_path / "out").exists()
