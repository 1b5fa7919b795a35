"""contrib/_template passes its own tests once copied, without being installed."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / "contrib" / "_template"


def test_a_copied_template_passes_its_own_tests(tmp_path):
    copy = tmp_path / "curvprune-example"
    shutil.copytree(TEMPLATE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info",
                                                                  ".pytest_cache"))
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "curvprune.testing.pytest_plugin",
         "-p", "no:cacheprovider", "tests"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"template tests failed:\n{result.stdout}\n{result.stderr}"
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout
