"""benchmarks/sosp_cost.py and benchmarks/sosp_digits.py run end to end in quick mode.

No timing or accuracy assertion (the machine is shared); the figures themselves are in
docs/benchmarks.md.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def run(script: str) -> str:
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^machine: .+, \d+ cores, torch threads \d+$", proc.stdout, re.MULTILINE)
    return proc.stdout


@pytest.mark.slow
def test_sosp_cost_quick() -> None:
    out = run("sosp_cost.py")
    assert re.search(r"^ratio SOSP-H / forward\+backward: \d+\.\d+x", out, re.MULTILINE), out
    assert "| SOSP-I score" in out and "S = 448 structures" in out


@pytest.mark.slow
def test_sosp_digits_quick() -> None:
    out = run("sosp_digits.py")
    rows = [line.split(" | ")[0] for line in out.splitlines()
            if line.startswith("| ") and "%" in line]
    assert rows == ["| sosp-h", "| sosp-h signed", "| sosp-h ggn", "| sosp-i",
                    "| sosp-i upper_bound", "| diagonal only", "| l1 global",
                    "| l1 layerwise (L1-filter)"], out
