"""benchmarks/greg_filter_digits.py runs end to end in quick mode, and its central claim holds there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.mark.slow
def test_filter_digits_quick():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "greg_filter_digits.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GReg-1 removes the same filters as L1 one-shot: True" in out
    rows = dict(re.findall(r"^\| (L1 one-shot|GReg-1 \+affine) \| [\d.]+ % \| ([\d.]+) %", out, re.M))
    assert set(rows) == {"L1 one-shot", "GReg-1 +affine"}
    # Same filters removed; with the growth first the network has let go of them (seeded run).
    assert float(rows["GReg-1 +affine"]) > float(rows["L1 one-shot"]) + 20
