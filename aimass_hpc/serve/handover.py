"""Time-limit handover: a replica replaces itself before its job ends.

The serve job asks Slurm for the site's warning signal ``GRACE`` seconds before the time
limit (``#SBATCH --signal``). On it the replica

1. submits its own job script again (``sbatch --array=TASK job.sh`` from the run directory:
   same model, options and run directory; only this replica's array task),
2. writes a PENDING endpoint record for the replacement (so ``aimass serve stop`` finds it
   even before it starts),
3. keeps serving until the replacement's record says READY (or the grace time is nearly
   spent), and only then drains.

Clients therefore always have a READY replica to go to, and the endpoint never disappears.
This runs on the compute node, so it calls ``sbatch`` directly through
:mod:`aimass_hpc.common.slurm_cli` (job-side code imports nothing from the login-node side);
the replacement chain continues as long as the service does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

from aimass_hpc.common import slurm_cli
from aimass_hpc.common.errors import AimassError, SchedulerError
from aimass_hpc.serve.endpoints import (
    EndpointRecord,
    EndpointState,
    read_records,
    stop_requested,
    write_record,
)

if TYPE_CHECKING:
    from aimass_hpc.serve.server import Replica

log = logging.getLogger("aimass.serve")

# Seconds kept back from the grace period for the drain itself.
DRAIN_RESERVE_S = 8.0


def submit_replacement(run_dir: str, array_task: str | None) -> str:
    """Queue the run directory's ``job.sh`` again; returns the job ref (``ID`` or ``ID_TASK``).

    ``SchedulerError`` when sbatch is missing, silent, refuses, or prints no job id.
    """
    options = [f"--array={array_task}"] if array_task is not None else []
    argv = slurm_cli.sbatch_parsable_argv(os.path.join(run_dir, "job.sh"), options)
    # Scrubbed environment: sbatch must not copy this job's allocation into the replacement.
    proc = slurm_cli.run_command(argv, cwd=run_dir, env=slurm_cli.submission_env(), timeout=120)
    if proc.returncode != 0:
        raise SchedulerError(f"sbatch refused the replacement: {proc.stderr.strip()[:300]}")
    job_id = slurm_cli.parse_sbatch_parsable(proc.stdout).job_id
    return f"{job_id}_{array_task}" if array_task is not None else job_id


def cancel_job(job_ref: str) -> None:
    """``scancel`` one job (or array task) from the job side; errors are logged, not raised."""
    try:
        proc = slurm_cli.run_command(
            ["scancel", job_ref], env=slurm_cli.submission_env(), timeout=60
        )
    except (OSError, AimassError) as exc:
        log.error("handover: cannot cancel %s: %s", job_ref, exc)
        return
    if proc.returncode != 0:
        log.error("handover: scancel %s: %s", job_ref, proc.stderr.strip()[:300])


async def handover_on_warning(replica: Replica) -> None:
    """Submit a replacement for ``replica`` and return once it is READY (or time is up)."""
    rec = replica.record
    grace = float(os.environ.get("AIMASS_GRACE_SECONDS", "120") or 120)
    deadline = time.monotonic() + max(grace - replica.opts.drain_grace_s - DRAIN_RESERVE_S, 5.0)
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if stop_requested(rec.run_dir):  # `serve stop` is under way: nothing to hand over to
        log.warning("handover: the service is being stopped; no replacement")
        return
    try:
        new_ref = await asyncio.to_thread(submit_replacement, rec.run_dir, task)
    except (OSError, AimassError) as exc:
        log.error("handover: %s", exc)
        write_record(rec, message=f"handover failed: {exc}")
        return
    log.warning("handover: replacement job %s submitted for %s", new_ref, rec.key)
    successor = EndpointRecord(
        model_ref=rec.model_ref,
        model_name=rec.model_name,
        version=None,
        state=EndpointState.PENDING,
        job_id=new_ref,
        replica=rec.replica,
        run_dir=rec.run_dir,
        token_file=rec.token_file,
        message=f"replaces {rec.job_id}",
    )
    write_record(successor, message=f"replaces {rec.job_id} (time-limit handover)")
    # `serve stop` writes its marker before it reads the records: either it sees the record
    # written above, or this check sees the marker -- the new job is never orphaned.
    if stop_requested(rec.run_dir):
        log.warning("handover: the service is being stopped; cancelling %s", new_ref)
        await asyncio.to_thread(cancel_job, new_ref)
        write_record(successor, EndpointState.STOPPED, message="cancelled: service stopping")
        return
    write_record(rec, message=f"handing over to {new_ref}")
    while time.monotonic() < deadline:
        for other in read_records(rec.run_dir):
            if other.job_id != new_ref or other.replica != rec.replica:
                continue
            if other.state == EndpointState.READY:
                log.warning("handover: %s is READY; draining %s", new_ref, rec.key)
                return
            if other.state == EndpointState.FAILED:
                log.error("handover: replacement %s failed: %s", new_ref, other.message)
                return
        await asyncio.sleep(0.5)
    log.error("handover: %s not READY in time; draining anyway", new_ref)
