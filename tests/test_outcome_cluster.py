"""On the real cluster: a failed run is shown as FAILED, naming its first failing rank.

Specification:
- rank 1 of 4 (2 nodes x 2 ranks, a user script run through ``aimass train``) raises KeyError
  while the others wait in a collective; srun kills them. ``aimass train --wait``, ``aimass
  wait`` and ``aimass status`` (text and ``--json``) name rank 1, its exit code 1 and the
  KeyError, not the killed peers; ``aimass logs JOB --rank 1`` prints only rank 1's lines;
- a run that Slurm calls COMPLETED but whose ``result.json`` says failed is FAILED with the
  run's reason in ``aimass train --wait`` (exit 1) and ``aimass status``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from _sitefixtures import write_site

from aimass_hpc.config.site import Site

pytestmark = pytest.mark.cluster

FAILING_RANK = """
import sys
import torch.distributed as dist
from aimass_hpc import runtime

job = runtime.init()
print(f"rank {job.rank} ready", flush=True)
if job.rank == 1:
    config = {"lr": 0.1}
    config["batch_size"]  # KeyError on this rank only
dist.barrier()  # the others wait here until srun kills them
print(f"rank {job.rank} passed the barrier", flush=True)
"""

SAYS_FAILED = """
import json, os
from aimass_hpc import runtime

job = runtime.init()
path = os.path.join(os.environ["AIMASS_RUN_DIR"], "result.json")
with open(path + ".tmp", "w") as fh:
    json.dump({"status": "failed", "restart": 0,
               "reason": "restart limit reached, 3 of 3, last step 3 of 300"}, fh)
os.replace(path + ".tmp", path)
"""


@pytest.fixture(scope="module")
def site(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Site:
    return write_site(tmp_path_factory.mktemp("outcome-site"), "dev")


def aimass(site: Site, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args, "--site", site.source or ""],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip


def train_wait(site: Site, tmp_path: Path, script: str, nodes: int, tasks: int) -> dict[str, Any]:
    (tmp_path / "user_script.py").write_text(script)
    spec = tmp_path / "spec.toml"
    spec.write_text(
        '[script]\npath = "user_script.py"\n[model]\nname = "outcome-model"\n'
        f'[job]\nnodes = {nodes}\ntasks_per_node = {tasks}\ntime = "00:05:00"\n'
    )
    out = aimass(site, "train", str(spec), "--wait", "--json")
    assert out.returncode == 1, out.stdout + out.stderr  # the work ran and failed
    return json.loads(out.stdout)


def test_the_first_failing_rank_is_named_with_its_error(site: Site, tmp_path: Path) -> None:
    summary = train_wait(site, tmp_path, FAILING_RANK, nodes=2, tasks=2)
    job_id = summary["job_id"]
    logs = "\n".join(p.read_text() for p in sorted((Path(summary["run_dir"]) / "logs").iterdir()))
    assert summary["state"] == "FAILED", logs
    failure = summary["failure"]
    assert failure is not None, logs
    assert (failure["rank"], failure["exit_code"]) == (1, 1), logs
    assert failure["error"].startswith("KeyError"), failure
    assert "rank 1 exited 1: KeyError" in summary["reason"]

    waited = aimass(site, "wait", job_id, "--json")
    assert waited.returncode == 1
    (row,) = json.loads(waited.stdout)
    assert row["failure"]["rank"] == 1 and row["failure"]["exit_code"] == 1
    assert "KeyError" in row["reason"] and row["failure"]["traceback"][-1].startswith("KeyError")

    status = aimass(site, "status", job_id)
    assert status.returncode == 0, status.stderr
    assert "rank 1 exited 1: KeyError" in status.stdout and "FAILED" in status.stdout
    assert 'config["batch_size"]' in status.stdout  # the end of rank 1's own traceback

    rank1 = aimass(site, "logs", job_id, "--rank", "1")
    assert rank1.returncode == 0, rank1.stderr
    assert "rank 1 ready" in rank1.stdout and "KeyError" in rank1.stdout
    for other in ("rank 0 ready", "rank 2 ready", "rank 3 ready", "srun:"):
        assert other not in rank1.stdout
    assert "rank 0 ready" in aimass(site, "logs", job_id, "--rank", "0").stdout


def test_a_completed_job_whose_result_says_failed_is_failed(site: Site, tmp_path: Path) -> None:
    summary = train_wait(site, tmp_path, SAYS_FAILED, nodes=1, tasks=1)
    assert summary["scheduler_state"] == "COMPLETED"
    assert summary["state"] == "FAILED"
    assert summary["reason"] == "restart limit reached, 3 of 3, last step 3 of 300"
    status = aimass(site, "status", summary["job_id"], "--json")
    (row,) = json.loads(status.stdout)
    assert row["state"] == "FAILED" and row["scheduler_state"] == "COMPLETED"
    state = json.loads((Path(summary["run_dir"]) / "state.json").read_text())
    assert state["outcome"]["state"] == "FAILED"
