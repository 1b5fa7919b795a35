"""Checkpoints, ``--resume`` and determinism of whole runs (issue 8, items 2 and 4).

Every equality here is exact (``torch.equal`` on the saved tensors): on one CPU, in one process,
the same operations in the same order give the same bits, so a resumed run that restores model,
optimizer, masks, schedule state, loop position and every generator must end exactly where the
uninterrupted run ends. The runs are tiny (digits MLP, 11 optimizer steps per epoch) and share
one cached dense model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curvprune.cli import main
from curvprune.errors import CheckpointError, ConfigError, NumericalError
from curvprune.run.checkpoints import (
    FORMAT,
    PartialRun,
    RunCheckpoints,
    check_plain,
    load_checkpoint_file,
    save_checkpoint,
)
from curvprune.run.execute import execute_run

BASE = """
[model]
name = "{model}"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.6
loss_samples = 32
[finetune]
epochs = {epochs}
[run]
progress = false
checkpoint_every = {every}
"""

GRADUAL_WOODFISHER = """
[estimator]
name = "woodfisher"
block_size = 16
damping = 1e-3
num_grads = 16
[scorer]
name = "obs"
[schedule]
name = "gradual"
start = 1
end = 15
frequency = 4
initial_sparsity = 0.1
"""

ONESHOT_THEN_FINETUNE = """
[estimator]
name = "dense"
block_size = 16
damping = 1e-3
num_grads = 16
[scorer]
name = "obs"
[schedule]
name = "oneshot"
steps = 2
"""

GREG = """
[schedule]
name = "greg"
variant = 1
granularity = "weight"
update_reg_interval = 1
reg_granularity_prune = 0.05
reg_upper_limit = 0.5
stabilize_reg_interval = 4
lr_prune = 0.01
"""

CHANNEL_REMOVAL = """
[scorer]
name = "magnitude"
granularity = "channel"
[mask]
name = "channel"
remove = true
"""

CONFIGS = {"gradual-woodfisher": GRADUAL_WOODFISHER, "oneshot+finetune": ONESHOT_THEN_FINETUNE,
           "greg": GREG, "channel-removal": CHANNEL_REMOVAL}
MODELS = {"channel-removal": "digits-cnn"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One dense digits MLP for every run of this module (trained by the first run)."""
    return tmp_path_factory.mktemp("dense-cache")


def config(tmp_path: Path, method: str, *, epochs: int = 2, every: int = 4) -> Path:
    path = tmp_path / f"{method}.toml"
    model = MODELS.get(method, "digits-mlp")
    path.write_text(BASE.format(model=model, epochs=epochs, every=every) + CONFIGS[method])
    return path


class Stop(KeyboardInterrupt):
    """Raised from the checkpoint callback: an interruption right after a checkpoint."""


def stop_after(n: int):
    saved: list[Path] = []

    def on_checkpoint(path: Path) -> None:
        saved.append(path)
        if len(saved) == n:
            raise Stop

    return on_checkpoint


def same_tensors(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "masks.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), f"{name}: {key} differs"


def without_times(result: dict) -> dict:
    steps = [{k: v for k, v in s.items() if k != "times"} for s in result["steps"]]
    return {"steps": steps, "accuracy": result["accuracy"], "loss": result["loss"],
            "sparsity": result["sparsity"]}


# --------------------------------------------------------------------------------------------
# Resume equals the uninterrupted run
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "cut"),
    [
        ("gradual-woodfisher", 2),  # step 8: mid-epoch, between pruning events 5 and 9
        ("gradual-woodfisher", 4),  # step 16: second epoch, after the last event
        ("oneshot+finetune", 3),  # fine-tuning step 12, after the one-shot pruning
        ("greg", 2),  # inside GReg's prune phase (penalty growing)
        ("greg", 5),  # fine-tuning after GReg's removal
        ("channel-removal", 2),  # fine-tuning the physically smaller CNN
    ],
)
def test_resumed_run_ends_bit_identical_to_the_uninterrupted_one(tmp_path, cache, method, cut):
    cfg, out = config(tmp_path, method), tmp_path / "runs"
    reference = execute_run(cfg, out=out, name="ref", quiet=True, cache=cache)
    with pytest.raises(Stop):
        execute_run(cfg, out=out, name="cut", quiet=True, cache=cache,
                    on_checkpoint=stop_after(cut))
    partial = out / "cut.partial"
    assert sorted(p.name for p in partial.iterdir()) == [".lock", "checkpoint.pt", "config.toml"]
    assert not (out / "cut").exists()

    resumed = execute_run(None, resume=partial, quiet=True, cache=cache)
    assert resumed.run_dir == out / "cut" and not partial.exists()
    assert reference.result["run"]["resumed"] is None
    assert resumed.result["run"]["resumed"]["step"] > 0
    same_tensors(reference.run_dir, resumed.run_dir)
    assert without_times(resumed.result) == without_times(reference.result)


def test_checkpoint_holds_only_tensors_and_plain_values(tmp_path, cache):
    cfg, out = config(tmp_path, "gradual-woodfisher"), tmp_path / "runs"
    with pytest.raises(Stop):
        execute_run(cfg, out=out, name="c", quiet=True, cache=cache, on_checkpoint=stop_after(1))
    path = out / "c.partial" / "checkpoint.pt"
    raw = torch.load(path, map_location="cpu", weights_only=True)  # refuses any other object
    check_plain(raw)
    assert raw["format"] == FORMAT and raw["phase"] == "prune_and_finetune"
    assert raw["loop"]["step"] == 4 and raw["session"]["iteration"] == 4
    assert raw["session"]["masks"].dtype == torch.bool
    assert [r["train_step"] for r in raw["session"]["reports"]] == [1]
    assert set(raw["rng"]["loaders"]) == {"grad"} and raw["rng"]["torch"].dtype == torch.uint8
    assert set(raw["model"]) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert load_checkpoint_file(path)["config_sha256"] == raw["config_sha256"]


def copy_cache(cache: Path, out: Path) -> None:
    """The CLI looks for dense models under <out>/cache."""
    (out / "cache").mkdir(parents=True, exist_ok=True)
    for f in cache.iterdir():
        (out / "cache" / f.name).write_bytes(f.read_bytes())


def test_cli_resume_continues_and_interrupt_prints_the_command(
    tmp_path, cache, capsys, monkeypatch
):
    cfg, out = config(tmp_path, "gradual-woodfisher"), tmp_path / "runs"
    copy_cache(cache, out)
    original = RunCheckpoints._save

    def save_then_interrupt(self, *args):
        original(self, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpoints, "_save", save_then_interrupt)
    assert main(["run", str(cfg), "--out", str(out), "--name", "r", "-q"]) == 130
    err = capsys.readouterr().err.strip()
    assert err == ("curvprune run: interrupted; continue with: curvprune run --resume "
                   f"{out / 'r.partial'}")
    monkeypatch.undo()
    assert main(["run", "--resume", str(out / "r.partial"), "-q"]) == 0
    assert (out / "r" / "result.json").is_file() and not (out / "r.partial").exists()


# --------------------------------------------------------------------------------------------
# What --resume refuses
# --------------------------------------------------------------------------------------------
def interrupted(tmp_path: Path, cache: Path, name: str = "i") -> Path:
    cfg, out = config(tmp_path, "gradual-woodfisher"), tmp_path / "runs"
    with pytest.raises(Stop):
        execute_run(cfg, out=out, name=name, quiet=True, cache=cache, on_checkpoint=stop_after(1))
    return out / f"{name}.partial"


def test_resume_refuses_a_different_config_naming_the_field(tmp_path, cache):
    partial = interrupted(tmp_path, cache)
    other = tmp_path / "other.toml"
    text = config(tmp_path, "gradual-woodfisher").read_text()
    other.write_text(text.replace("end = 15", "end = 14"))
    with pytest.raises(ConfigError, match=r"differs .* at schedule\.end \(saved 15, given 14\)"):
        execute_run(other, resume=partial, quiet=True, cache=cache)
    # the same config (defaults spelled out or not) is accepted
    cfg = config(tmp_path, "gradual-woodfisher")
    same = execute_run(cfg, resume=partial, quiet=True, cache=cache)
    assert same.run_dir.name == "i"


def test_resume_refuses_a_completed_run_a_missing_folder_and_other_out(tmp_path, cache):
    partial = interrupted(tmp_path, cache)
    with pytest.raises(ConfigError, match="keeps its own folder and name"):
        execute_run(None, resume=partial, out=tmp_path / "elsewhere", quiet=True, cache=cache)
    done = execute_run(None, resume=partial.parent / "i", quiet=True, cache=cache)  # by run name
    with pytest.raises(CheckpointError, match="this run is complete"):
        execute_run(None, resume=done.run_dir, quiet=True)
    with pytest.raises(CheckpointError, match="no interrupted run here"):
        execute_run(None, resume=tmp_path / "nothing", quiet=True)


def test_a_second_process_cannot_resume_the_same_run(tmp_path, cache):
    partial = interrupted(tmp_path, cache)
    holder = PartialRun.open(partial)  # holds the lock, as a running resume would
    try:
        with pytest.raises(CheckpointError, match="another process is running this run"):
            execute_run(None, resume=partial, quiet=True, cache=cache)
    finally:
        holder.release()
    assert (partial / "checkpoint.pt").is_file()  # the refused resume removed nothing


def test_a_run_without_checkpoints_leaves_no_partial_folder(tmp_path, cache):
    cfg = config(tmp_path, "gradual-woodfisher", every=0)
    outcome = execute_run(cfg, out=tmp_path / "runs", name="plain", quiet=True, cache=cache)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["plain"]
    assert outcome.result["run"]["seed"] == 0


def test_a_failing_run_before_any_checkpoint_removes_its_partial_folder(tmp_path, cache):
    text = config(tmp_path, "gradual-woodfisher").read_text()
    text = text.replace("[finetune]\n", "[finetune]\nlr = 1e30\n")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text.replace("checkpoint_every = 4", "checkpoint_every = 100"))
    with pytest.raises(NumericalError, match="finite"):
        execute_run(cfg, out=tmp_path / "runs", name="bad", quiet=True, cache=cache)
    assert not (tmp_path / "runs" / "bad.partial").exists()
    assert not (tmp_path / "runs" / "bad").exists()


def test_save_checkpoint_refuses_objects_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"a": torch.ones(2), "b": [1, 2.5, None, "x", (True,)], "c": {3: "y"}})
    with pytest.raises(TypeError, match=r"checkpoint\.b\[0\] is a \w*Path"):
        save_checkpoint(path, {"b": [Path("x")]})
    with pytest.raises(TypeError, match="TorchVersion"):
        save_checkpoint(path, {"v": torch.__version__})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


# --------------------------------------------------------------------------------------------
# Determinism (item 4)
# --------------------------------------------------------------------------------------------
def test_same_config_and_seed_give_the_same_masks_bit_for_bit(tmp_path):
    """Two runs that train their own dense model, and a third that loads it from the cache."""
    cfg = config(tmp_path, "gradual-woodfisher", every=0)
    a = execute_run(cfg, out=tmp_path / "a", name="r", quiet=True)
    b = execute_run(cfg, out=tmp_path / "b", name="r", quiet=True)
    c = execute_run(cfg, out=tmp_path / "a", name="again", quiet=True)  # dense model cached
    assert a.result["dense"]["source"] == "trained" and c.result["dense"]["source"] == "cache"
    same_tensors(a.run_dir, b.run_dir)
    same_tensors(a.run_dir, c.run_dir)
    record = json.loads((a.run_dir / "result.json").read_text())
    assert record["run"]["seed"] == 0
    assert {"python", "torch", "curvprune-core"} <= set(record["versions"])


def test_another_seed_gives_other_masks(tmp_path, cache):
    base = config(tmp_path, "gradual-woodfisher", every=0)
    other = tmp_path / "seed1.toml"
    other.write_text(base.read_text().replace("[run]\n", "[run]\nseed = 1\n"))
    a = execute_run(base, out=tmp_path / "r", name="s0", quiet=True, cache=cache)
    b = execute_run(other, out=tmp_path / "r", name="s1", quiet=True, cache=cache)
    ma = load_file(str(a.run_dir / "masks.safetensors"))
    mb = load_file(str(b.run_dir / "masks.safetensors"))
    assert any(not torch.equal(ma[k], mb[k]) for k in ma)


# --------------------------------------------------------------------------------------------
# A real kill (slow: a subprocess imports torch)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches(tmp_path, cache):
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg, out = config(tmp_path, "gradual-woodfisher", epochs=4, every=2), tmp_path / "runs"
    reference = execute_run(cfg, out=out, name="ref", quiet=True, cache=cache)
    copy_cache(cache, out)
    # Bit identity needs the same intra-op thread count on both sides (a multi-threaded GEMM
    # sums in another order); this process runs with the testing plugin's torch threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "curvprune.cli", "run", str(cfg), "--out", str(out),
         "--name", "k", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    checkpoint = out / "k.partial" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.is_file(), proc.communicate()[1].decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (out / "k").exists()
    resumed = execute_run(None, resume=out / "k.partial", quiet=True)
    same_tensors(reference.run_dir, resumed.run_dir)


def test_no_checkpoint_is_written_once_the_loss_is_not_finite(tmp_path):
    from curvprune.run.training import LoopState

    class Session:
        def state_dict(self):
            return {"iteration": 1}

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with RunCheckpoints() as checkpoints:
        checkpoints.start(1, tmp_path, "x", "[run]\n")
        _, after_step = checkpoints.phase("finetune", model=model, optimizer=optimizer,
                                          session=Session(), loaders={})
        after_step(LoopState(step=1, running=torch.tensor(2.0, dtype=torch.float64)))
        good = (tmp_path / "x.partial" / "checkpoint.pt").read_bytes()
        with pytest.raises(NumericalError, match="before optimizer step 2; no checkpoint"):
            after_step(LoopState(step=2, running=torch.tensor(float("nan"), dtype=torch.float64)))
        assert (tmp_path / "x.partial" / "checkpoint.pt").read_bytes() == good
    assert not (tmp_path / "x.partial").exists()  # the block succeeded: the folder is removed


def test_nothing_in_curvprune_unpickles_arbitrary_objects():
    """Every ``torch.load`` in the shipped source passes ``weights_only=True``; no pickle loads."""
    import ast

    root = Path(__file__).resolve().parents[1]
    sources = [p for top in ("core", "plugins", "contrib")
               for p in (root / top).rglob("src/**/*.py")]
    assert len(sources) > 20
    offenders, seen = [], 0
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            name = f"{getattr(owner, 'id', '?')}.{node.func.attr}"
            if name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} {name}")
            seen += name == "torch.load"
            if name == "torch.load" and not any(
                k.arg == "weights_only" and getattr(k.value, "value", None) is True
                for k in node.keywords
            ):
                offenders.append(f"{path.relative_to(root)}:{node.lineno} torch.load")
    assert offenders == [] and seen >= 1  # the scan does see curvprune's own torch.load
