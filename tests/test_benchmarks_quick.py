"""The benchmark suite: discovery, bad input, the docs writer, and every benchmark in quick mode.

``python -m benchmarks --quick`` is what CI runs (marked slow: about two minutes on two cores);
it checks that every script still runs, not its figures.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import _suite  # noqa: E402

sys.path.remove(str(ROOT))


def run_suite(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, check=False)


def test_discovery_finds_every_script_and_reads_its_constants():
    found = _suite.discover()
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_")}
    assert set(found) == scripts
    assert {"per_sample_grads", "oneshot_vs_epoch", "plan_accuracy", "loss_audit",
            "compare_digits"} <= set(found)
    assert "cuda" in found["oneshot_vs_epoch"].devices
    assert found["per_sample_grads"].headline == r"^speed-up .*$"
    assert found["compare_digits"].full_args[:2] == ("--seeds", "2")
    cmd = found["oneshot_vs_epoch"].command(quick=True, device="cuda")
    assert cmd[-3:] == ["--quick", "--device", "cuda"]
    assert "--device" not in found["mfac_speed"].command(quick=True, device="cpu")


def test_list_and_unknown_name():
    proc = run_suite("--list")
    assert proc.returncode == 0 and "oneshot_vs_epoch" in proc.stdout
    proc = run_suite("per_sample_grad")
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1
    assert "unknown benchmark 'per_sample_grad' (did you mean 'per_sample_grads'?)" in err


def test_docs_section_replaces_its_own_blocks_and_keeps_the_rest(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Hand-written\n\nkeep me\n")
    bench = _suite.discover()["mfac_speed"]

    def outcome(text: str, rc: int = 0) -> _suite.Outcome:
        o = _suite.Outcome(bench, [sys.executable, str(bench.path), "--quick"], rc, 1.0,
                           text, "boom" if rc else "")
        _suite.extract(o)
        return o

    first = outcome("static IHVP d=1: 1 ms; ratio 1.5x\n| a | b |\n|---|---|\n| 1 | 2 |\nend\n")
    assert first.headlines == ["static IHVP d=1: 1 ms; ratio 1.5x"]
    assert first.tables == ["| a | b |\n|---|---|\n| 1 | 2 |"]
    _suite.update_docs(docs, [first], "cpu")
    other = _suite.discover()["per_sample_grads"]
    extra = _suite.Outcome(other, ["python", str(other.path)], 0, 2.0, "speed-up x: 3x\n", "")
    _suite.extract(extra)
    _suite.update_docs(docs, [extra], "cpu")
    _suite.update_docs(docs, [outcome("", rc=1)], "cpu")
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n## Hand-written\n\nkeep me\n")
    assert text.count(_suite.BEGIN) == 1 and text.count("## Suite results (generated)") == 1
    assert "- speed-up x: 3x" in text, "other benchmarks' blocks are kept"
    assert "**Failed** (exit 1): `boom`" in text and "static IHVP d=1" not in text


@pytest.mark.slow
def test_every_benchmark_runs_in_quick_mode():
    proc = run_suite("--quick", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    n = len(_suite.discover())
    assert f"{n} of {n} benchmarks ok" in proc.stdout
    for model in ("digits-cnn", "digits-mlp"):
        assert re.search(rf"speed-up \(vmap over loop\) on {model}: \d+\.\d+x", proc.stdout)
    assert re.search(r"ratio one-shot prune / one epoch: \d+\.\d+x", proc.stdout)
    assert re.search(r"ratio measured / planned, woodfisher woodbury B=128: \d+\.\d+", proc.stdout)
