"""Reliability: bad paths, corrupt files, races, kills and malformed configs (issue 21).

Each category tries many inputs and asserts the same three things: the project's own one-line
error (no traceback, under 200 characters besides the paths it names), nothing written where it
should not be, and nothing executed from a file. docs/reliability.md counts the cases.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from curvprune import CheckpointError, CurvpruneError, Pipeline, SampleReuseWarning, execute_run
from curvprune.cli import main
from curvprune.run.checkpoint_files import (
    load_checkpoint_file,
    read_safetensors,
    read_weights_only,
    save_checkpoint,
)
from curvprune.run.execute import load_checkpoint
from curvprune.testing import DigitsMLP

QUICK = """
[model]
name = "digits-mlp"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.5
loss_samples = 0
[scorer]
name = "magnitude"
[run]
progress = false
"""

GRADUAL = """
[model]
name = "digits-mlp"
[data]
batch_size = 128
[train]
epochs = 1
[prune]
sparsity = 0.6
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
end = 15
frequency = 4
[finetune]
epochs = 3
[run]
progress = false
checkpoint_every = 2
"""


def write(folder: Path, text: str, name: str = "c.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def one_line(text: str) -> str:
    """The one error line of a failed command; its message (paths aside) is short."""
    text = text.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    message = text.split(" @ ")[0]
    assert len(message) < 200, f"{len(message)} characters: {message}"
    return text


def config_problems(exc: CurvpruneError) -> list[str]:
    """A config error lists every problem of the file, one short line each, each with its path."""
    lines = str(exc).splitlines()
    assert lines and "Traceback" not in str(exc)
    for line in lines:
        assert " @ " in line, line
        assert len(line.split(" @ ")[0]) < 200, line
    return lines


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` (files with their bytes, folders and links as None)."""
    out: dict[str, bytes | None] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        out[key] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


class _Stop(KeyboardInterrupt):
    """An interruption right after a checkpoint (raised from the checkpoint callback)."""


def _interrupt_after_first_checkpoint(cfg: Path, out: Path, cache: Path) -> None:
    """Leave ``out/k.partial`` with one checkpoint, as Ctrl-C after it would."""

    def stop(path: Path) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        execute_run(cfg, out=out, name="k", quiet=True, cache=cache, on_checkpoint=stop)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One dense digits MLP for the runs of this module (trained by the first run)."""
    return tmp_path_factory.mktemp("reliability-cache")


# --------------------------------------------------------------------------------------------
# Path traversal: a run never writes outside --out, never through a symbolic link
# --------------------------------------------------------------------------------------------
BAD_NAMES = ["../../x", "../x", "/abs", "/tmp/x", "a/b", "..", ".", ".hidden", "a\\b", "x\x01y",
             "tab\there", "", "é" * 120]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_a_bad_run_name_is_refused_before_anything_is_written(tmp_path, capsys, name):
    cfg = write(tmp_path, QUICK)
    before = tree(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs"), "--name", name]) == 2
    assert "single folder name" in one_line(capsys.readouterr().err)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_validate_refuses_a_bad_name_in_the_config(tmp_path, capsys, name):
    cfg = write(tmp_path, QUICK + f"name = {json.dumps(name)}\n")
    assert main(["validate", str(cfg)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "single folder name" in err or "control character" in err or "TOML" in err, err


def test_a_symbolic_link_is_never_written_through(tmp_path, capsys):
    target = tmp_path / "elsewhere"
    out = tmp_path / "runs"
    out.mkdir()
    (out / "r").symlink_to(target)  # dangling: a write would create 'elsewhere'
    assert main(["run", str(write(tmp_path, QUICK)), "--out", str(out), "--name", "r"]) == 2
    assert "exists already as a symbolic link" in one_line(capsys.readouterr().err)
    assert not target.exists()


def test_report_and_export_refuse_a_symlinked_run_directory(tmp_path, capsys, cache):
    run = execute_run(write(tmp_path, QUICK), out=tmp_path / "runs", name="r", quiet=True,
                      cache=cache)
    link = tmp_path / "link"
    link.symlink_to(run.run_dir)
    before = tree(run.run_dir)
    for command in (["report", str(link)], ["export", str(link)]):
        assert main(command) == 2
        assert "symbolic link" in one_line(capsys.readouterr().err)
    assert tree(run.run_dir) == before


def test_out_may_be_anywhere_even_behind_a_link(tmp_path, cache):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "via").symlink_to(real)
    run = execute_run(write(tmp_path, QUICK), out=tmp_path / "via", name="r", quiet=True,
                      cache=cache)
    assert (real / "r" / "result.json").is_file() and run.run_dir.name == "r"


# --------------------------------------------------------------------------------------------
# Static checks: validate finds what a run would find, before any training
# --------------------------------------------------------------------------------------------
CHANNELS = """
[prune]
sparsity = 0.5
targets = ['re:5\\.weight']
[scorer]
name = "magnitude"
granularity = "channel"
[mask]
name = "channel"
"""
STATIC = {
    "unknown torchvision model": ('[model]\nname = "torchvision:resnet1800"\n', "resnet18"),
    "misspelt model": ('[model]\nname = "digits-mpl"\n', "digits-mlp"),
    "missing checkpoint": ('[model]\ncheckpoint = "nope.pt"\n', "nope.pt"),
    "missing data folder": ('[data]\nname = "torchvision:CIFAR10"\nroot = "no/such"\n',
                            "CIFAR10 not found"),
    "image folder without splits": ('[data]\nname = "imagefolder"\nroot = "."\n', "'train'"),
    "module that does not import": ('[model]\nname = "module:no_such_mod:build"\n',
                                    "no_such_mod"),
    "nothing prunable": ('[model]\nname = "digits-mlp"\n' + CHANNELS, "can be pruned"),
}


@pytest.mark.parametrize("case", sorted(STATIC))
def test_validate_finds_what_a_run_would_before_any_compute(tmp_path, capsys, monkeypatch, case):
    text, expected = STATIC[case]
    monkeypatch.chdir(tmp_path)
    cfg = write(tmp_path, text)
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    if case == "module that does not import":  # validate names the module before importing it
        note, err = err.split("\n", 1)
        assert note.startswith("note: [model] name imports and runs the module 'no_such_mod'")
    assert expected in one_line(err)
    before = tree(tmp_path)
    assert main(["run", str(cfg), "--out", str(tmp_path / "runs")]) == 2
    assert expected in one_line(capsys.readouterr().err)
    assert tree(tmp_path) == before  # refused before the dense model was trained or cached


# --------------------------------------------------------------------------------------------
# Checkpoint fuzz: any bytes give one CheckpointError, nothing is executed
# --------------------------------------------------------------------------------------------
READERS = {
    "run checkpoint": load_checkpoint_file,
    "weights-only file": read_weights_only,
    "safetensors file": read_safetensors,
    "model checkpoint": lambda path: load_checkpoint(DigitsMLP(), path),
}


def _assert_refused_or_read(reader, path: Path) -> None:
    try:
        reader(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        one_line(str(exc))
    except CurvpruneError as exc:  # a readable file of the wrong shape: a config mismatch
        one_line(str(exc))


fuzz = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@fuzz
@given(data=st.binary(max_size=4096), reader=st.sampled_from(sorted(READERS)))
def test_random_bytes_are_refused_in_one_line(tmp_path, data, reader):
    path = tmp_path / ("f.safetensors" if reader == "safetensors file" else "f.pt")
    path.write_bytes(data)
    with pytest.raises(CurvpruneError) as info:
        READERS[reader](path)
    one_line(str(info.value))


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("real")
    model = DigitsMLP()
    state = {"format": "curvprune.checkpoint/1", "phase": "finetune", "config_sha256": "0",
             "loop": {}, "model": dict(model.state_dict()), "optimizer": {}, "session": {},
             "rng": {}}
    save_checkpoint(folder / "c.pt", state)
    save_file(model.state_dict(), str(folder / "m.safetensors"))
    return {"pt": (folder / "c.pt").read_bytes(),
            "safetensors": (folder / "m.safetensors").read_bytes()}


@fuzz
@given(kind=st.sampled_from(["pt", "safetensors"]), cut=st.floats(0, 1, exclude_max=True),
       flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                      max_size=4))
def test_truncated_and_bit_flipped_real_files_are_read_or_refused(tmp_path, real_files, kind,
                                                                   cut, flips):
    data = bytearray(real_files[kind])
    for where, bit in flips:
        data[int(where * len(data))] ^= 1 << bit
    data = data[: max(1, int(len(data) * (1 - cut)))] if cut > 0.01 else data
    path = tmp_path / f"f.{kind}"
    path.write_bytes(bytes(data))
    for name, reader in READERS.items():
        if (kind == "safetensors") == (name == "safetensors file" or name == "model checkpoint"):
            _assert_refused_or_read(reader, path)


class _Payload:
    """Unpickling this runs code (creates a marker file): what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("wrap", ["torch.save", "raw pickle", "inside a state dict"])
def test_a_pickle_carrying_code_is_refused_and_never_run(tmp_path, wrap):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = _Payload(marker)
    if wrap == "torch.save":
        torch.save(payload, path)
    elif wrap == "raw pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save({"format": "curvprune.checkpoint/1", "model": {"w": payload}}, path)
    for name, reader in READERS.items():
        if name == "safetensors file":
            continue
        with pytest.raises(CheckpointError) as info:
            reader(path)
        one_line(str(info.value))
    assert not marker.exists()


@pytest.mark.parametrize("content", ["text", "empty", "truncated", "code"])
def test_resume_from_a_corrupt_checkpoint_is_one_line_and_changes_nothing(
        tmp_path, capsys, cache, content):
    cfg = write(tmp_path, GRADUAL)
    out = tmp_path / "runs"
    _interrupt_after_first_checkpoint(cfg, out, cache)
    checkpoint = out / "k.partial" / "checkpoint.pt"
    data = {"text": b"this is not a checkpoint\n", "empty": b"",
            "truncated": checkpoint.read_bytes()[:100],
            "code": pickle.dumps(_Payload(tmp_path / "pwned"))}[content]
    checkpoint.write_bytes(data)
    before = tree(out)
    assert main(["run", "--resume", str(out / "k.partial")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "checkpoint" in err and str(checkpoint) in err
    assert tree(out) == before and not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------
# Races and kills (real processes)
# --------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen([sys.executable, "-m", "curvprune.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _copy_cache(cache: Path, out: Path) -> None:
    (out / "cache").mkdir(parents=True, exist_ok=True)
    for f in cache.iterdir():
        (out / "cache" / f.name).write_bytes(f.read_bytes())


@pytest.mark.slow
def test_two_concurrent_runs_of_one_name_one_wins_the_other_says_so(tmp_path, cache):
    cfg = write(tmp_path, QUICK)
    out = tmp_path / "runs"
    execute_run(cfg, out=tmp_path / "warm", name="w", quiet=True, cache=cache)  # fills the cache
    _copy_cache(cache, out)
    procs = [_cli("run", str(cfg), "--out", str(out), "--name", "same", "-q") for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    results = [(p.returncode, *o) for p, o in zip(procs, outputs, strict=True)]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    # Which line the loser prints depends on when it meets the winner: the name taken at the
    # start, the lock of a run in progress, or (when both computed) the atomic rename finding
    # the winner's folder; each names the run, in one line
    line = one_line(loser)
    assert ("'same'" in line or "another process" in loser
            or ("run directory exists already" in line and line.endswith(f"@ {out / 'same'}")))
    run = out / "same"
    json.loads((run / "result.json").read_text())
    for f in ("model.safetensors", "masks.safetensors"):
        load_file(str(run / f))
    assert sorted(p.name for p in out.iterdir()) == ["cache", "same"]  # no staging left


def _same_tensors(a: Path, b: Path) -> None:
    for name in ("model.safetensors", "masks.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_ends_like_the_uninterrupted_run(tmp_path, cache):
    cfg = write(tmp_path, GRADUAL)
    reference_out = tmp_path / "reference"
    tick = time.monotonic()
    reference = execute_run(cfg, out=reference_out, name="ref", quiet=True, cache=cache)
    duration = time.monotonic() - tick
    rng = random.Random(21)
    outcomes = []
    for i in range(3):
        out = tmp_path / f"kill{i}"
        _copy_cache(cache, out)
        proc = _cli("run", str(cfg), "--out", str(out), "--name", "k", "-q")
        # the partial folder appears when the run starts (torch imported, config checked):
        # kill at a random point of the run from there
        deadline = time.monotonic() + 120
        while not (out / "k.partial").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, duration))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        for path in out.rglob("*.json"):
            json.loads(path.read_text())  # nothing half-written
        if (out / "k").exists():
            final = out / "k"  # it finished before the kill
            outcomes.append("finished")
        elif (out / "k.partial").exists():
            final = execute_run(None, resume=out / "k.partial", quiet=True).run_dir
            outcomes.append("resumed")
        else:
            raise AssertionError("the run left neither a run directory nor a partial folder")
        _same_tensors(reference.run_dir, final)
    assert "resumed" in outcomes, outcomes


# --------------------------------------------------------------------------------------------
# Config fuzz: any malformed config is a CurvpruneError, never a traceback
# --------------------------------------------------------------------------------------------
TABLES = ["model", "data", "prune", "train", "finetune", "run", "plugins", "estimator", "scorer",
          "schedule", "mask", "nonsense"]
KEYS = ["name", "sparsity", "targets", "ignore", "damping", "block_size", "num_grads", "epochs",
        "lr", "seed", "out", "steps", "n_m", "granularity", "kwargs", "batch_size", "typo",
        "checkpoint", "disable", "remove", "power", "start", "end", "frequency", "dtype"]
NAMES = ["woodfisher", "mfac", "dense", "obs", "magnitude", "global", "nm", "channel",
         "oneshot", "gradual", "digits-mlp", "digits", "fake", "../x", "module:os:system", ""]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
    st.sampled_from(NAMES), st.text(max_size=8),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner,
                                                                max_size=3),
    max_leaves=6,
)
configs = st.dictionaries(
    st.sampled_from(TABLES),
    st.dictionaries(st.sampled_from(KEYS), values, max_size=4) | scalars,
    max_size=6,
)


@settings(max_examples=300, deadline=None)
@given(configs)
def test_any_malformed_config_is_one_line_of_the_project_error(raw):
    try:
        Pipeline.from_config(raw)
    except CurvpruneError as exc:
        config_problems(exc)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_any_text_as_a_config_file_is_refused_in_one_line_or_accepted(tmp_path, text):
    path = tmp_path / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        Pipeline.from_config(path)
    except CurvpruneError as exc:
        config_problems(exc)


# --------------------------------------------------------------------------------------------
# Warnings reach the report
# --------------------------------------------------------------------------------------------
def test_reused_samples_are_a_warning_in_the_log_the_json_and_the_report(tmp_path, cache):
    text = QUICK.replace('[scorer]\nname = "magnitude"', (
        '[estimator]\nname = "dense"\nblock_size = 8\nnum_grads = 2000\n[scorer]\nname = "obs"'
    ))
    with pytest.warns(SampleReuseWarning):
        run = execute_run(write(tmp_path, text), out=tmp_path / "runs", name="r", quiet=True,
                          cache=cache)
    (warned,) = run.result["warnings"]
    assert "holds 1347 samples but the gradients need 2000" in warned
    assert warned in (run.run_dir / "report.md").read_text()


def test_resume_refuses_a_symlinked_partial_folder(tmp_path, capsys, cache):
    out = tmp_path / "runs"
    _interrupt_after_first_checkpoint(write(tmp_path, GRADUAL), out, cache)
    link = tmp_path / "elsewhere.partial"
    link.symlink_to(out / "k.partial")
    before = tree(out)
    assert main(["run", "--resume", str(link)]) == 2
    assert "symbolic link" in one_line(capsys.readouterr().err)
    assert tree(out) == before
