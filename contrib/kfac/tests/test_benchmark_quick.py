"""benchmarks/kfac_oneshot.py runs end to end in quick mode (no accuracy assertion).

Marked slow (about 10 s of CPU): ``python -m benchmarks --quick`` runs the same smoke test in CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "kfac_oneshot.py"


@pytest.mark.slow
def test_kfac_oneshot_quick() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "machine: " in proc.stdout and "curvlinops " in proc.stdout
    assert "| sparsity | magnitude | diagfisher ×1 | kfac ×1 | kfac ×2 | woodfisher ×1 | woodfisher ×2 |" in proc.stdout
    rows = [line.split(" | ")[0] for line in proc.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert rows == ["| 50 %", "| 90 %"]
    assert "ratio of prune time, kfac / woodfisher (1 step): " in proc.stdout
