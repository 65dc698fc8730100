"""Serving fixes found in use (issue 14), on the real local Slurm cluster.

Specification:
- ``aimass bench NAME:latest`` (and ``endpoints``/``stop``) find a service started as
  ``NAME:latest``;
- a ``serve stop`` that races a time-limit handover's sbatch orphans no job: the replacement
  queued just before the stop (its endpoint record not yet written) is cancelled too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import toymodels
from aimass_hpc.serve.endpoints import STOP_MARKER, read_records
from aimass_hpc.serve.handover import submit_replacement

pytestmark = pytest.mark.cluster

KWARGS: dict[str, Any] = {"in_features": 6, "hidden": 16, "out_features": 3}


def aimass(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"aimass {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def test_latest_service_is_benched_and_a_stop_racing_a_handover_orphans_nothing(
    cluster, tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    torch.manual_seed(0)
    ModelRepository(site.models_root).save(
        "toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS)
    )
    sf = str(site.source)
    out = json.loads(
        aimass("serve", "toy:latest", "--site", sf, "--wait", "--timeout", "180", "--json").stdout
    )
    run_dir = Path(out["run_dir"])
    try:
        bench = json.loads(
            aimass(
                "bench",
                "toy:latest",
                "--site",
                sf,
                "--duration",
                "0.5",
                "--concurrency",
                "2",
                "--json",
            ).stdout  # fmt: skip
        )
        assert bench["requests_ok"] > 0 and bench["requests_failed"] == 0
        rows = json.loads(aimass("endpoints", "toy:latest", "--site", sf, "--json").stdout)
        assert [r["state"] for r in rows] == ["READY"]
        # What a replica's handover does at its warning signal: sbatch the run dir's job.sh
        # for its array task. The stop comes before the replacement's record is written.
        new_job = submit_replacement(str(run_dir), "0")
        stopped = json.loads(aimass("serve", "stop", "toy:latest", "--site", sf, "--json").stdout)
        assert new_job.split("_")[0] in stopped["cancelled"]  # found by its script, by job id
        assert (run_dir / STOP_MARKER).exists()
        state = get_scheduler(site).status([new_job])[new_job]
        assert state.is_terminal, f"handover job {new_job} orphaned: {state.state.value}"
        assert {r.state for r in read_records(run_dir)} <= {"STOPPED", "FAILED"}
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)
