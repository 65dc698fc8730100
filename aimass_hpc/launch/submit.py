"""From a request to a queued job: render, make the run directory, submit, record.

``submit`` is what every ``aimass`` command that starts work calls (train, search trials,
serve); ``submit_script`` does the same for a plain batch script a user wrote.

A submit command that does not answer in time (:class:`~aimass_hpc.launch.scheduler.CommandTimeout`)
may still have queued the job, so it is never reported as a plain failure: the job is looked
up by its run directory and adopted when found; otherwise the run's state says
``submit_unknown`` and :class:`SubmitUnknown` tells the user how to check before resubmitting.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass_hpc import __version__
from aimass_hpc.common.errors import AimassError, InputError, SchedulerError
from aimass_hpc.common.fsutil import read_user_text
from aimass_hpc.common.names import shown
from aimass_hpc.common.timelimit import TimeLimitError, parse_time
from aimass_hpc.config.job_spec import (
    JobRequest,
    check_sbatch_extra,
    sbatch_options,
    slurm_job_name,
)
from aimass_hpc.config.site import Site
from aimass_hpc.launch.render import render_request
from aimass_hpc.launch.runs import RunDir, index_job
from aimass_hpc.launch.scheduler import CommandTimeout, Scheduler, get_scheduler


class SubmitUnknown(SchedulerError):
    """The submit command timed out and no job for the run could be found (yet): the job may
    or may not be queued. The run's state says ``submit_unknown``; do not resubmit blindly."""

    def __init__(self, message: str, run_dir: RunDir) -> None:
        super().__init__(message)
        self.run_dir = run_dir


@dataclass(frozen=True)
class Submission:
    """The outcome of :func:`submit`. ``job_id`` is None for a dry run.

    ``note`` says something the user should know about how the job got its id (it was
    adopted after the submit command timed out).
    """

    run_dir: RunDir
    job_id: str | None
    script: str
    request: JobRequest | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``--json``)."""
        data: dict[str, Any] = {
            "job_id": self.job_id,
            "run_dir": str(self.run_dir.path),
            "name": self.request.name if self.request else self.run_dir.name,
            "dry_run": self.job_id is None,
        }
        if self.note:
            data["note"] = self.note
        return data


def submit(
    site: Site,
    request: JobRequest,
    *,
    spec: dict[str, Any] | None = None,
    files: Mapping[str, bytes | str] | None = None,
    dry_run: bool = False,
    runs_root: str | os.PathLike[str] | None = None,
    scheduler: Scheduler | None = None,
) -> Submission:
    """Render ``request`` for ``site``, create its run directory and queue it.

    The run directory gets ``spec.json`` (the resolved request, the site, and the caller's
    ``spec`` payload under ``"spec"``), ``job.sh``, every entry of ``files`` (relative path ->
    content) and ``state.json``. With ``dry_run`` nothing is written or queued: the returned
    ``run_dir`` is where it would have gone and ``script`` is the script. ``scheduler``
    overrides the site's backend (tests wrap its runner).
    """
    resolved = request.resolve(site)
    scheduler = scheduler or get_scheduler(site)
    scheduler.check_request(resolved)
    _warn_once(time_limit_warning(site, resolved))
    root = Path(runs_root) if runs_root is not None else site.runs_root
    if dry_run:
        run = RunDir.new_path(root, resolved.name)
        return Submission(run, None, render_request(site, resolved, run.path), resolved)
    run = RunDir.create(root, resolved.name)
    try:
        script = render_request(site, resolved, run.path)  # rendered once, for its real path
    except AimassError:
        run.discard()  # a bad template or value leaves no empty run directory behind
        raise
    run.write_spec(
        {
            "request": resolved.model_dump(mode="json"),
            "site": site.name,
            "site_ref": site.ref(),
            "spec": spec or {},
            "aimass_version": __version__,
            "created_at": time.time(),
        }
    )
    run.write_script(script)
    for relpath, data in (files or {}).items():
        run.write_file(relpath, data)
    run.update_state(
        name=resolved.name,
        kind=resolved.kind,
        site=site.name,
        status="rendered",
        scheduler=scheduler.name,
        created_at=time.time(),
    )
    job_id, note = _queue(scheduler, run, root)
    return Submission(run, job_id, script, resolved, note)


def submit_script(
    site: Site,
    script_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    sbatch_args: list[str] | None = None,
    dry_run: bool = False,
    runs_root: str | os.PathLike[str] | None = None,
    scheduler: Scheduler | None = None,
) -> Submission:
    """Submit a plain batch script the user wrote, with a run directory like any other job.

    The script is copied into the run directory as ``job.sh`` and runs there (its relative
    ``#SBATCH --output`` lands in the run dir); ``AIMASS_RUN_DIR`` and ``AIMASS_JOB_NAME`` are
    in its environment. ``sbatch_args`` go on the sbatch command line, so they are checked
    like a spec's ``sbatch_extra`` plus the resource options a script may legitimately set.
    """
    source = Path(script_path)
    text = read_user_text(source, "batch script")
    if not text.startswith("#!"):
        raise InputError(f"{source}: a batch script must start with #! (e.g. #!/bin/bash)")
    args = list(sbatch_args or [])
    for arg in args:
        _check_script_arg(arg)
    job_name = name or source.stem
    scheduler = scheduler or get_scheduler(site)
    root = Path(runs_root) if runs_root is not None else site.runs_root
    if dry_run:
        return Submission(RunDir.new_path(root, job_name), None, text)
    run = RunDir.create(root, job_name)
    run.write_script(text)
    run.write_spec(
        {
            "request": None,
            "script": str(source.resolve()),
            "sbatch_args": args,
            "site": site.name,
            "site_ref": site.ref(),
            "spec": {},
            "aimass_version": __version__,
            "created_at": time.time(),
        }
    )
    run.update_state(
        name=job_name,
        kind="script",
        site=site.name,
        status="rendered",
        scheduler=scheduler.name,
        created_at=time.time(),
    )
    options = sbatch_options(text)
    if not any(a.startswith("--job-name=") for a in args) and not {"--job-name", "-J"} & set(
        options
    ):
        args.insert(0, f"--job-name={slurm_job_name(job_name)}")
    if not any(a.startswith("--output=") for a in args) and not {"--output", "-o"} & set(options):
        args.insert(0, "--output=logs/slurm-%j.out")  # Slurm's output next to our logs
    env = {"AIMASS_RUN_DIR": str(run.path), "AIMASS_JOB_NAME": job_name, "AIMASS_SITE": site.ref()}
    job_id, note = _queue(scheduler, run, root, args, env)
    return Submission(run, job_id, text, note=note)


# Seconds a job needs after it starts before it can act on the warning signal: the runtime
# imports torch, joins the distributed world and takes a first step (tens of seconds on a
# loaded node) and only then can it finish a step and checkpoint. One minute is a floor, not
# an estimate for large models.
STARTUP_MARGIN_SECONDS = 60

_warned: set[str] = set()


def time_limit_warning(site: Site, request: JobRequest) -> str | None:
    """A one-line warning when a requeueable job's time limit is shorter than the site's
    preemption grace plus :data:`STARTUP_MARGIN_SECONDS` (the warning signal would come too
    early, or before the job could checkpoint); None when the limit is long enough."""
    if not request.signal or request.time is None:
        return None
    try:
        seconds = parse_time(request.time)
    except TimeLimitError:
        return None  # the request was validated; nothing to warn about here
    grace = site.preemption.grace_seconds
    if seconds is None or seconds >= grace + STARTUP_MARGIN_SECONDS:
        return None
    return (
        f"job {shown(request.name)}: time limit {request.time} ({seconds} s) is shorter than the "
        f"site's preemption.grace_seconds ({grace} s) plus {STARTUP_MARGIN_SECONDS} s to start "
        "up: the job may be warned before it can checkpoint"
    )


def _warn_once(message: str | None) -> None:
    """Say ``message`` on stderr once per process (a search submits many alike trials)."""
    if message and message not in _warned:
        _warned.add(message)
        print(f"aimass: warning: {message}", file=sys.stderr)


# Options a plain script's submitter may pass (they are what the script would otherwise say).
_SCRIPT_ALLOWED = {
    "--job-name",
    "--nodes",
    "--ntasks",
    "--ntasks-per-node",
    "--cpus-per-task",
    "--gres",
    "--gpus",
    "--gpus-per-node",
    "--mem",
    "--time",
    "--partition",
    "--account",
    "--qos",
    "--reservation",
    "--dependency",
    "--array",
    "--requeue",
    "--signal",
    "--constraint",
}


def _check_script_arg(arg: str) -> None:
    option, sep, value = arg.partition("=")
    try:
        if option in _SCRIPT_ALLOWED:
            check_sbatch_extra(f"--x={value}" if sep else "--x")  # the same value check
        else:
            check_sbatch_extra(arg)
    except ValueError as exc:
        raise InputError(f"sbatch_args: {exc}") from None


def _queue(
    scheduler: Scheduler,
    run: RunDir,
    root: Path,
    extra_args: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Submit ``run``'s script and record the id; returns ``(job_id, note)``."""
    try:
        job_id = scheduler.submit(
            run.script_path, run_dir=run.path, extra_args=extra_args or [], env=env
        )
    except CommandTimeout as exc:
        return _after_timeout(scheduler, run, root, exc)
    except AimassError as exc:
        run.update_state(status="submit_failed", error=str(exc))
        raise
    record_job(run, root, job_id)
    return job_id, ""


def record_job(run: RunDir, root: Path, job_id: str, **extra: Any) -> None:
    """Mark ``run`` submitted with ``job_id``, then index it under ``root``.

    The run directory's own state first: if the index cannot be written, the job id is still
    recorded where every command that looks at the run reads it.
    """
    run.update_state(status="submitted", job_id=job_id, submitted_at=time.time(), **extra)
    index_job(root, job_id, run)


def adopt_queued_job(scheduler: Scheduler, run: RunDir, root: Path) -> str | None:
    """The job queued for ``run`` (looked up by its run directory), recorded; None if none.

    Raises ``SchedulerError`` when the scheduler cannot be asked.
    """
    found = scheduler.find_jobs_for_run(run.path)
    if not found:
        return None
    job_id = found[-1]
    record_job(run, root, job_id, adopted=True)
    return job_id


def _after_timeout(
    scheduler: Scheduler, run: RunDir, root: Path, exc: CommandTimeout
) -> tuple[str, str]:
    """The submit command timed out: adopt the job if it was queued, else say it may be."""
    try:
        job_id = adopt_queued_job(scheduler, run, root)
        lookup = "no job for it is in the queue yet"
    except SchedulerError as lookup_exc:
        job_id, lookup = None, f"and looking it up failed too ({lookup_exc})"
    if job_id is not None:
        note = f"{exc}, but the job was queued: adopted job {job_id} found by its run directory"
        run.update_state(note=note)
        return job_id, note
    run.update_state(status="submit_unknown", error=f"{exc}; {lookup}")
    raise SubmitUnknown(
        f"{exc}; the job may still be queued ({lookup}). Do not resubmit yet: check with "
        f"`aimass status {run.path}` or `squeue --me` (run directory {run.path}, "
        "state submit_unknown)",
        run,
    ) from None
