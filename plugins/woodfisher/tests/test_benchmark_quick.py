"""benchmarks/woodfisher_inverse.py runs end to end in quick mode (no timing assertion)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "woodfisher_inverse.py"


def test_woodfisher_inverse_quick(tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "machine: " in proc.stdout and "torch " in proc.stdout
    (row,) = json.loads(out.read_text())["rows"]
    # Same inverse from both algorithms, and a peak memory the plan accounts for.
    assert row["relative_difference"] < 1e-4
    assert row["gram_peak_bytes"] > 0 and row["gram_memory_bytes"] > 0
