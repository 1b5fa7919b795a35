"""Fault injection (issue 8, item 5): every fault gives one clear line and harms nothing.

For each fault: the error names what went wrong and where, the user's model is unchanged (a
``Pipeline.prune`` restores it), and earlier outputs (run directories, the dense-model cache,
the last good checkpoint) are byte for byte what they were.
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvprune import Pipeline, get_plugin_manager, hookimpl
from curvprune.cli import main
from curvprune.errors import NumericalError, PluginHookError
from curvprune.run.checkpoints import FORMAT, PartialRun, save_checkpoint
from curvprune.run.execute import execute_run

RUN = """
[model]
name = "digits-mlp"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.5
loss_samples = 32
[estimator]
name = "dense"
block_size = 16
damping = 1e-3
num_grads = 16
[scorer]
name = "obs"
[schedule]
name = "gradual"
start = 1
end = 9
frequency = 4
[finetune]
epochs = 1
[run]
progress = false
checkpoint_every = 3
"""


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (hidden lock files aside)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """An out folder holding a completed run ``r`` and the dense-model cache."""
    out = tmp_path_factory.mktemp("earlier") / "runs"
    cfg = out.parent / "c.toml"
    cfg.write_text(RUN)
    execute_run(cfg, out=out, name="r", quiet=True)
    return out


@pytest.fixture
def out(earlier, tmp_path) -> Path:
    """A private copy of ``earlier``."""
    target = tmp_path / "runs"
    for path, blob in snapshot(earlier).items():
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_bytes(blob)
    return target


def write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# NaN / Inf
# --------------------------------------------------------------------------------------------
class NaNAfter(nn.Module):
    """An MLP whose output turns NaN (or inf) after ``calls`` forward passes."""

    def __init__(self, calls: int, value: float = float("nan")) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.calls, self.value, self.seen = calls, value, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        out = self.net(x)
        return out * self.value if self.seen > self.calls else out


def batches() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16)


ONESHOT = {"prune": {"sparsity": 0.5, "loss_samples": 16}, "scorer": {"name": "obs"},
           "estimator": {"name": "dense", "damping": 1e-3, "num_grads": 16, "block_size": 16}}


# forward passes before the gradients: the plan's probe of one chunk's activations, the audit
@pytest.mark.parametrize(("calls", "value", "fragment"), [
    (0, float("nan"), "loss is not finite on the audit samples"),  # NaN from the start
    (2, float("nan"), "non-finite gradients in 'net.0.weight'"),  # NaN once gradients start
    (2, float("inf"), "non-finite gradients in 'net.0.weight'"),
])
def test_nan_or_inf_in_pruning_raises_and_restores_the_model(calls, value, fragment):
    model = NaNAfter(calls, value)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NumericalError, match=fragment):
        Pipeline.from_config(ONESHOT).prune(model, batches())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_inf_loss_from_the_loss_function_is_caught():
    model = NaNAfter(10**9)
    before = copy.deepcopy(model.state_dict())

    def infinite(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y) * float("inf")

    with pytest.raises(NumericalError, match="not finite"):
        Pipeline.from_config(ONESHOT).prune(model, batches(), infinite)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


NAN_MODEL = '''
import torch
from torch import nn
from curvprune.run.models import build_model


class NaNAfterSteps(nn.Module):
    """digits-mlp whose training-mode outputs turn NaN after ``steps`` forward passes."""

    def __init__(self, num_classes, steps):
        super().__init__()
        self.inner = build_model("digits-mlp", num_classes=num_classes)
        self.steps, self.seen = steps, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.seen += 1
            if self.seen > self.steps:
                return out * float("nan")
        return out


def build(num_classes=10, steps=5):
    return NaNAfterSteps(num_classes, steps)
'''


def test_nan_during_a_checkpointed_training_run(out, tmp_path, capsys, monkeypatch):
    """NaN from the 17th training step on: dense training (11 steps) passes, fine-tuning fails.

    One line, exit 1, no run directory; the checkpoint of step 3 (before the NaN) is kept and
    finite; no checkpoint is written once the loss is NaN; the earlier run and cache are intact.
    """
    (tmp_path / "nanmodel.py").write_text(NAN_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    model = 'name = "module:nanmodel:build"\nkwargs = {steps = 16}'
    text = RUN.replace('name = "digits-mlp"', model)
    before = snapshot(out)
    assert main(["run", str(write(tmp_path, text)), "--out", str(out), "--name", "n", "-q"]) == 1
    assert "not finite" in one_line(capsys)
    assert snapshot(out).items() >= before.items()  # the run 'r' and the cache are intact
    assert not (out / "n").exists()
    state = torch.load(out / "n.partial" / "checkpoint.pt", weights_only=True)
    assert state["loop"]["step"] == 3
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values())


# --------------------------------------------------------------------------------------------
# Singular curvature, tiny damping
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["dense", "woodfisher", "mfac", "diagfisher"])
def test_tiny_damping_in_float32_fails_cleanly_or_stays_finite(estimator):
    """damping = 1e-30 with 4 gradients in blocks of 16: F is singular up to round-off.

    Either the estimator reports it (NumericalError, model restored), or the pruned weights it
    produces are finite and at the target sparsity; never NaN weights.
    """
    cfg = copy.deepcopy(ONESHOT)
    cfg["estimator"] = {"name": estimator, "damping": 1e-30, "num_grads": 4}
    if estimator in ("dense", "woodfisher"):
        cfg["estimator"]["block_size"] = 16
    model = NaNAfter(10**9)
    before = copy.deepcopy(model.state_dict())
    try:
        result = Pipeline.from_config(cfg).prune(model, batches())
    except NumericalError as exc:
        assert "\n" not in str(exc) and "damping" in str(exc)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    else:
        assert all(bool(torch.isfinite(v).all()) for v in model.state_dict().values())
        assert result.sparsity == pytest.approx(0.5, abs=1e-6)


# --------------------------------------------------------------------------------------------
# A plugin that raises inside a lifecycle hook
# --------------------------------------------------------------------------------------------
class Exploder:
    @hookimpl
    def curvprune_after_prune_step(self, pipeline, report):
        raise RuntimeError("disk quota\nexceeded")


def test_plugin_raising_in_a_hook_is_named_and_the_model_restored():
    host = get_plugin_manager(plugins=[("exploder", Exploder())])
    model = NaNAfter(10**9)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PluginHookError) as info:
        Pipeline.from_config(ONESHOT, host=host).prune(model, batches())
    assert str(info.value) == (
        "plugin 'exploder' failed in curvprune_after_prune_step: RuntimeError: disk quota exceeded")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_run_with_a_raising_plugin(out, tmp_path, fake_dist, capsys):
    fake_dist("curvprune-exploder", "exploder", '''
        from curvprune import hookimpl

        @hookimpl
        def curvprune_after_prune_step(pipeline, report):
            raise ValueError("bad report")
    ''')
    before = snapshot(out)
    cfg = write(tmp_path, RUN.replace("checkpoint_every = 3", "checkpoint_every = 0"))
    assert main(["run", str(cfg), "--out", str(out), "--name", "n", "-q"]) == 1
    assert one_line(capsys) == ("curvprune run: error: plugin 'exploder' failed in "
                                "curvprune_after_prune_step: ValueError: bad report")
    assert snapshot(out) == before


# --------------------------------------------------------------------------------------------
# Killed while writing
# --------------------------------------------------------------------------------------------
def test_writer_failing_half_way_leaves_no_run_directory(out, tmp_path, capsys, monkeypatch):
    """The run directory is staged: masks and weights are written, then the report fails."""
    def broken(record):
        raise OSError("No space left on device")

    monkeypatch.setattr("curvprune.run.execute.render_report", broken)
    before = snapshot(out)
    cfg = write(tmp_path, RUN.replace("checkpoint_every = 3", "checkpoint_every = 0"))
    assert main(["run", str(cfg), "--out", str(out), "--name", "n", "-q"]) == 1
    assert "No space left on device" in one_line(capsys)
    assert snapshot(out) == before  # no run 'n', no staging folder, r and the cache intact
    assert sorted(p.name for p in out.iterdir()) == ["cache", "r"]


def test_checkpoint_write_interrupted_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": FORMAT, "step": 1})
    good = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # killed in the middle of serialising

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"format": FORMAT, "step": 2})
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left


# --------------------------------------------------------------------------------------------
# Corrupted checkpoints
# --------------------------------------------------------------------------------------------
@pytest.fixture
def partial(out, tmp_path) -> Path:
    """An interrupted run (stopped right after its first checkpoint)."""
    def stop(path: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_run(write(tmp_path, RUN), out=out, name="p", quiet=True, on_checkpoint=stop)
    return out / "p.partial"


class Payload:
    """Unpickling this would create the file ``target``: proof that code ran."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def corrupt(path: Path, how: str, sentinel: Path) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong keys":
        buffer = io.BytesIO()
        torch.save({"format": FORMAT, "model": {}}, buffer)
        path.write_bytes(buffer.getvalue())
    elif how == "other format":
        buffer = io.BytesIO()
        torch.save({"state_dict": {"w": torch.ones(1)}}, buffer)
        path.write_bytes(buffer.getvalue())
    elif how == "arbitrary object":
        state = torch.load(path, weights_only=True)
        state["extra"] = {"x": Payload(sentinel)}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getvalue())
    elif how == "another config":
        state = torch.load(path, weights_only=True)
        state["config_sha256"] = "0" * 64
        save_checkpoint(path, state)


@pytest.mark.parametrize(("how", "fragment"), [
    ("truncated", "checkpoint is truncated or corrupt"),
    ("empty", "checkpoint is truncated or corrupt"),
    ("wrong keys", "checkpoint lacks 'phase', 'config_sha256'"),
    ("other format", "not a curvprune run checkpoint"),
    ("arbitrary object", "weights-only loading refuses"),
    ("another config", "checkpoint was written for another config.toml"),
])
def test_corrupted_checkpoint_is_refused_in_one_line(partial, tmp_path, capsys, how, fragment):
    sentinel = tmp_path / "code-ran"
    checkpoint = partial / "checkpoint.pt"
    corrupt(checkpoint, how, sentinel)
    before = snapshot(partial)
    assert main(["run", "--resume", str(partial), "-q"]) == 2
    err = one_line(capsys)
    assert fragment in err and err.endswith(f"@ {checkpoint}")
    assert "weights_only` set to `False" not in err  # never advise unsafe loading
    assert not sentinel.exists()
    assert snapshot(partial) == before  # the partial folder is kept as it was
    assert not (partial.parent / "p").exists()


def test_model_checkpoint_carrying_an_object_is_refused(tmp_path, capsys):
    sentinel = tmp_path / "code-ran"
    evil = tmp_path / "dense.pt"
    torch.save({"state_dict": {"x": Payload(sentinel)}}, evil)
    text = RUN.replace('name = "digits-mlp"', f'name = "digits-mlp"\ncheckpoint = "{evil}"')
    out = tmp_path / "runs"
    assert main(["run", str(write(tmp_path, text)), "--out", str(out), "-q"]) == 2
    err = one_line(capsys)
    assert "weights-only loading refuses" in err and err.endswith(f"@ {evil}")
    assert not sentinel.exists()
    assert not out.exists() or not any(p.name != "cache" for p in out.iterdir())


# --------------------------------------------------------------------------------------------
# Bad config files
# --------------------------------------------------------------------------------------------
def test_config_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[run]\nname = "résumé"\n'.encode("latin-1"))
    assert main(["run", str(path), "--out", str(tmp_path / "runs"), "-q"]) == 2
    err = one_line(capsys)
    assert "config file is not UTF-8" in err and err.endswith(f"@ {path}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "mps:0"])
def test_unknown_device(tmp_path, capsys, device):
    cfg = write(tmp_path, RUN + f'device = "{device}"\n')
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "-q"]) == 2
    assert one_line(capsys).endswith("@ run.device")
    assert not (tmp_path / "runs").exists()


def test_partial_folder_is_never_left_by_a_config_error(tmp_path, capsys):
    cfg = write(tmp_path, RUN.replace("[finetune]\nepochs = 1", "[finetune]\nepochs = 0"))
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "-q"]) == 2
    assert "@ finetune.epochs" in one_line(capsys)
    assert not (tmp_path / "runs").exists()


def test_a_stale_lock_from_a_killed_process_does_not_block_resume(partial):
    # flock locks die with their process; a leftover .lock file is harmless
    assert (partial / ".lock").exists()
    PartialRun.open(partial).release()
    assert os.path.isdir(partial)
