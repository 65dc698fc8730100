"""The package type-checks: mypy with the ``[tool.mypy]`` settings in pyproject.toml.

The same check as ``make lint``; run through this interpreter so the venv's mypy (and its
pydantic plugin) checks this checkout's aimass_hpc. Its cache is ``.mypy_cache`` (git-ignored).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_is_clean():
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"mypy failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert "Success" in proc.stdout, proc.stdout
