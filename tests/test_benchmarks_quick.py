"""The per-sample-gradient benchmark runs end to end in quick mode (no timing assertion)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "per_sample_grads.py"


def test_per_sample_grads_quick():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for model in ("digits-cnn", "digits-mlp"):
        pattern = rf"^speed-up \(vmap over loop\) on {model}: \d+\.\d+x"
        assert re.search(pattern, proc.stdout, flags=re.MULTILINE), proc.stdout
    assert re.search(r"^machine: .+, \d+ cores, torch threads \d+$", proc.stdout, re.MULTILINE)
    assert f"torch {torch.__version__}" in proc.stdout
