"""Shared fixtures.

``cluster`` brings the real local Slurm cluster up (scripts/dev-cluster, idempotent) and exports
its SLURM_CONF into this process, so tests talk to real slurmctld/slurmd daemons.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV_CLUSTER = ROOT / "scripts" / "dev-cluster"

# The project's own package and venv come first for subprocesses (jobs, CLI calls).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
)


@pytest.fixture(scope="session")
def cluster() -> dict[str, str]:
    """The local Slurm cluster, up; returns the exported environment (SLURM_CONF, ...)."""
    up = subprocess.run([str(DEV_CLUSTER), "up"], capture_output=True, text=True)
    if up.returncode != 0:
        pytest.fail(f"scripts/dev-cluster up failed:\n{up.stdout}\n{up.stderr}")
    env_out = subprocess.run(
        [str(DEV_CLUSTER), "env"], capture_output=True, text=True, check=True
    ).stdout
    exported: dict[str, str] = {}
    for line in env_out.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            exported[key] = value.strip("'\"")
    os.environ.update(exported)
    return exported
