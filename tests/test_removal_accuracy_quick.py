"""benchmarks/removal_accuracy.py runs end to end in quick mode (issue #18 B).

No accuracy assertion (tiny sizes, shared machine); the figures are in docs/benchmarks.md. One
exact cross-check: curvprune's raw group L2 (``magnitude``, ``extent = "group"``, ``normalize =
"none"``) and Torch-Pruning's ``GroupMagnitudeImportance(p=2, "sum", normalizer=None,
bias=True)`` score the same parameters, so they keep the same parameter count.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "removal_accuracy.py"


@pytest.mark.slow
def test_removal_accuracy_quick() -> None:
    pytest.importorskip("torch_pruning")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^machine: .+, \d+ cores, torch threads 1$", out, re.MULTILINE)
    assert re.search(r"^versions: torch .+, torch-pruning \d", out, re.MULTILINE)
    assert len(re.findall(r"^right after removal of 50 %, ", out, re.MULTILINE)) == 2
    tables = re.findall(r"^\| (magnitude \(group, raw\)|TP group norm) \| [^|]+ \| ([^|]+) \|",
                        out, re.MULTILINE)
    assert len(tables) == 4
    params = {}
    for label, kept in tables:
        params.setdefault(label, []).append(kept.strip())
    assert params["magnitude (group, raw)"][0] == params["TP group norm"][0]  # digits CNN
