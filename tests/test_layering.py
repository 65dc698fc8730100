"""The import direction between packages holds: `lint-imports` with the contracts in pyproject.toml.

Login side: cli > launch > config > common; job side (runtime, serve), repo and hpo never import
launch or cli; common imports no other aimass_hpc package; only cli imports cli.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# import-linter ships a console script and no ``python -m`` entry; call its click command
# through this interpreter so the venv's import-linter checks this checkout's aimass_hpc.
LINT = (
    "import sys; from importlinter.cli import lint_imports_command;"
    " sys.exit(lint_imports_command())"
)


def test_import_contracts_are_kept():
    proc = subprocess.run(
        [sys.executable, "-c", LINT, "--no-cache", "--config", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"lint-imports failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    assert "0 broken" in proc.stdout, proc.stdout
