"""The M-FAC benchmark scripts run end to end in quick mode (no timing assertions)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


@pytest.mark.slow
def test_speed_quick():
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "mfac_speed.py"), "--quick"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^static IHVP d=\d+ m=\d+: .* ratio \d+\.\d+x$", proc.stdout, re.M)
    assert re.search(r"^dynamic d=\d+ m=64: update .* ms, IHVP .* ms$", proc.stdout, re.M)
