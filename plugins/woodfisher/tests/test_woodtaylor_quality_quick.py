"""benchmarks/woodtaylor_quality.py runs end to end in quick mode (no accuracy assertion)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "woodtaylor_quality.py"


def test_woodtaylor_quality_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "machine: " in proc.stdout and "torch " in proc.stdout
    assert "| sparsity | obs | woodtaylor exact | woodtaylor first_order r=0.003 |" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| 50%", "| 70%", "| 80%", "| 90%"]
