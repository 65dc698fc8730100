"""The supervisor requeues itself at its time limit and hands its lease over (issue 14).

Specification, on the real local Slurm cluster: a supervised torch service (toy model, one
replica) whose supervisor job has a 1-minute limit and a site grace of 45 s gets its warning
early; the supervisor releases its lease and requeues its own job (restart count >= 1); the
next run of the job takes the lease over (the decisions say from whom) and keeps supervising:
a replica cancelled after the requeue is replaced by it. There is never more than one acting
supervisor: every decision that acts comes from the holder of the latest lease, and each new
holder took the lease over from the one before. ``serve stop`` leaves no job behind.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _sitefixtures import write_site
from test_supervisor_cluster import KWARGS, aimass, ready, wait_replaced

from aimass_hpc.launch import serving as S
from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import toymodels
from aimass_hpc.serve.endpoints import read_records

pytestmark = pytest.mark.cluster

# Decisions that change the service (what two supervisors must never both do).
ACTING = {"replace", "replace-failed", "fence", "retire", "check-failed", "scale-up", "scale-down"}


def wait_for(what: str, timeout: float, probe: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_supervisor_requeues_at_its_limit_and_its_next_run_keeps_supervising(
    cluster, tmp_path: Path
) -> None:
    # Slurm checks limits every 30 s: a 45 s grace on a 1-minute limit always finds a check.
    site = write_site(
        tmp_path, "dev", preemption={"signal": "USR1", "grace_seconds": 45, "max_restarts": 6}
    )
    torch.manual_seed(0)
    ModelRepository(site.models_root).save(
        "toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS)
    )
    sf = str(site.source)
    # The replica keeps the partition's default limit; only the supervisor gets 1 minute.
    out = json.loads(
        aimass("serve", "toy", "--site", sf, "--check-interval", "1", "--wait", "--timeout",
               "180", "--json").stdout
    )  # fmt: skip
    run_dir = Path(out["run_dir"])
    scheduler = get_scheduler(site)
    try:
        S.set_desired(run_dir, supervise=True)
        opts = S.ServeOptions(ref="toy", replicas=1, time="00:01:00", check_interval_s=1.0)
        sup_job = str(S.start_supervisor(site, run_dir, opts).job_id)

        def second_requeued_run_leads() -> bool:
            st = scheduler.status([sup_job])[sup_job]
            assert not st.is_terminal, st
            return any(
                d["action"] == "lease-acquired" and d["supervisor"] == f"{sup_job}/r2"
                for d in S.read_decisions(run_dir)
            )

        # Two requeues: the requeued run requeues itself in turn (its warning comes again).
        wait_for("a second requeued run to take the lease", 300, second_requeued_run_leads)
        assert scheduler.status([sup_job])[sup_job].restart_count >= 2
        victim = ready(run_dir, 0)
        assert victim is not None
        subprocess.run(["scancel", victim.job_id], check=True)
        new = wait_replaced(run_dir, victim, timeout=240)
        assert new.history[0]["why"] == "submitted by the supervisor"
        decisions = S.read_decisions(run_dir)
        (replace,) = [d for d in decisions if d["action"] == "replace"]
        assert replace["supervisor"].startswith(f"{sup_job}/r")  # a requeued run replaced it
        assert replace["old_job_id"] == victim.job_id

        # One acting supervisor at a time: each acting decision comes from the latest holder,
        # each holder took over from the one before, each requeue handed the lease over.
        holder: str | None = None
        handovers = 0
        for d in decisions:
            if d["action"] == "lease-acquired":
                assert d["took_over"] == holder, d
                if holder is not None:
                    assert "released by" in d["why"], d
                    handovers += 1
                holder = d["supervisor"]
            elif d["action"] == "supervisor-requeued":
                assert d["supervisor"] == holder, d
            elif d["action"] in ACTING:
                assert d["supervisor"] == holder, (d, holder)
            assert d["action"] != "standby", d  # never two runs at once
        assert handovers >= 2
        requeues = [d for d in decisions if d["action"] == "supervisor-requeued"]
        assert [d["supervisor"] for d in requeues[:2]] == [sup_job, f"{sup_job}/r1"]
        assert all("time-limit warning" in d["why"] for d in requeues)
        logs = run_dir / S.SUPERVISOR_RUNS
        assert list(logs.rglob("restart-2.log")), "no log of the second requeued run"
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        jobs = scheduler.find_jobs_for_run(run_dir)
        statuses = scheduler.status([*jobs, sup_job])
        if all(s.is_terminal for s in statuses.values()):
            break
        time.sleep(1)
    assert all(s.is_terminal for s in statuses.values()), statuses
    assert not any(r.state == "READY" for r in read_records(run_dir))
