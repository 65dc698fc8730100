"""Slurm through its command-line tools, with explicit, stable output formats.

* ``sbatch --parsable`` prints ``JOBID[;CLUSTER]``; :mod:`aimass_hpc.common.slurm_cli` reads it
  (and builds the ``scontrol requeue`` call), shared with the job side.
* ``status`` makes ONE ``squeue --user=ME --states=all --array -O ...`` call for any number of jobs
  (no ``-j``: in 22.05 one unknown id there fails the whole query) and falls back to one
  ``sacct -X --parsable2`` call for the ids the controller has already forgotten (older than
  ``MinJobAge``). slurmdbd lags the controller, which is why squeue is asked first. When that
  sacct call fails (slurmdbd down, or no accounting at all), forgotten jobs are ``UNKNOWN``
  with ``source`` :data:`~aimass_hpc.launch.scheduler.base.LOOKUP_FAILED`: they may have run, so
  callers must not take them for ids nobody knows.
* ``sbatch`` gets ``$AIMASS_SBATCH_TIMEOUT`` seconds (default 60); when it does not answer in
  time, :class:`~aimass_hpc.launch.scheduler.base.CommandTimeout` says the job may be queued anyway.
* ``scancel`` is silent about unknown ids in 22.05, so ``cancel`` checks the ids first.
"""

from __future__ import annotations

import math
import os
import pwd
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from aimass_hpc.common.errors import InputError, SchedulerError
from aimass_hpc.common.slurm_cli import (
    digits_or_none,
    error_line,
    is_job_ref,
    parse_sbatch_parsable,
    sbatch_parsable_argv,
    scontrol_requeue,
    submission_env,
)
from aimass_hpc.common.slurm_states import JobState, aggregate_state, normalize_state
from aimass_hpc.common.timelimit import parse_elapsed
from aimass_hpc.launch.scheduler.base import (
    LOOKUP_FAILED,
    AccountingUnavailable,
    CommandRunner,
    JobStatus,
    Scheduler,
    check_answered,
)

# Name goes last: it is the only field that can contain the separator.
SQUEUE_FIELDS = (
    "JobArrayID",
    "ArrayJobID",
    "State",
    "TimeUsed",
    "NodeList",
    "Reason",
    "exit_code",
    "RestartCnt",
    "Name",
)
SQUEUE_FORMAT = ",".join(f"{field}:|" for field in SQUEUE_FIELDS)
SACCT_FIELDS = (
    "JobID",
    "JobIDRaw",
    "State",
    "Elapsed",
    "NodeList",
    "ExitCode",
    "Reason",
    "JobName",
)
SBATCH_TIMEOUT_ENV = "AIMASS_SBATCH_TIMEOUT"
SBATCH_TIMEOUT_DEFAULT = 60.0


def sbatch_timeout() -> float:
    """Seconds ``sbatch`` may take (``$AIMASS_SBATCH_TIMEOUT``, default 60)."""
    raw = os.environ.get(SBATCH_TIMEOUT_ENV, "").strip()
    if not raw:
        return SBATCH_TIMEOUT_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise InputError(f"${SBATCH_TIMEOUT_ENV}: {raw!r} is not a positive number of seconds")
    return value


def _wait_status_to_exit(raw: str) -> int | None:
    """squeue's exit_code is a raw wait status: exit N -> N, killed by signal S -> 128+S."""
    try:
        status = int(raw)
    except ValueError:
        return None
    if status & 0x7F:
        return 128 + (status & 0x7F)
    return status >> 8


def _sacct_exit(raw: str) -> int | None:
    """sacct's ExitCode is ``EXIT:SIGNAL``."""
    code, _, signal = raw.partition(":")
    try:
        if signal and int(signal):
            return 128 + int(signal)
        return int(code)
    except ValueError:
        return None


def _output_override(run_dir: str | os.PathLike[str]) -> list[str]:
    """``--output`` for a run dir whose path Slurm would mangle, else nothing.

    sbatch joins the working directory and a relative ``--output`` into one path and slurmd
    expands ``%`` patterns in all of it, so a run dir containing ``%`` or ``\\`` breaks the
    script's ``#SBATCH --output=logs/slurm-%j.out``. A path containing a backslash is taken
    literally once every backslash is removed, so escaping each ``%`` and ``\\`` keeps it
    intact (at the price of one log file for all array tasks).
    """
    path = str(Path(run_dir).resolve())
    if "%" not in path and "\\" not in path:
        return []
    escaped = re.sub(r"([%\\])", r"\\\1", path)
    return [f"--output={escaped}/logs/slurm-batch.out"]


def _aggregate(job_id: str, tasks: list[JobStatus], source: str) -> JobStatus:
    """One status for an array job from its tasks' statuses."""
    state = aggregate_state([t.state for t in tasks])
    elapsed = max((t.elapsed or 0 for t in tasks), default=None)
    nodes = ",".join(sorted({t.nodes for t in tasks if t.nodes}))
    failed = [t for t in tasks if t.state.is_terminal and t.state is not JobState.COMPLETED]
    exit_codes = [t.exit_code for t in tasks if t.exit_code]
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.state.value] = counts.get(task.state.value, 0) + 1
    reason = " ".join(f"{n}x{s}" for s, n in sorted(counts.items()))
    return JobStatus(
        job_id=job_id,
        name=tasks[0].name,
        state=state,
        elapsed=elapsed,
        nodes=nodes,
        reason=f"array: {reason}",
        exit_code=(exit_codes[0] if exit_codes else (0 if not failed else None)),
        restart_count=max(t.restart_count for t in tasks),
        source=source,
        raw_state=state.value,
        array_tasks=counts,
    )


class SlurmScheduler(Scheduler):
    """The default backend on a Slurm login node."""

    name = "slurm"

    def __init__(self, runner: CommandRunner | None = None) -> None:
        super().__init__(runner)

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        script_path: str | os.PathLike[str],
        *,
        run_dir: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> str:
        argv = sbatch_parsable_argv(
            str(Path(script_path).resolve()), [*extra_args, *_output_override(run_dir)]
        )
        proc = self.runner(argv, env=submission_env(env), cwd=run_dir, timeout=sbatch_timeout())
        if proc.returncode != 0:
            raise SchedulerError(f"sbatch refused the job: {error_line(proc.stderr, proc.stdout)}")
        return parse_sbatch_parsable(proc.stdout).job_id

    def test_submit(
        self, script_path: str | os.PathLike[str], *, run_dir: str | os.PathLike[str]
    ) -> str:
        """``sbatch --test-only``: the controller validates the script without queueing it."""
        argv = ["sbatch", "--test-only", str(Path(script_path).resolve())]
        proc = self.runner(argv, env=submission_env(), cwd=run_dir)
        message = error_line(proc.stderr, proc.stdout)
        if proc.returncode != 0:
            raise SchedulerError(f"sbatch --test-only refused the script: {message}")
        return message

    # ------------------------------------------------------------------ status

    def status(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        ids = [str(i).strip() for i in job_ids]
        rows = self._squeue()
        by_id = {row.job_id: row for row in rows}
        by_array: dict[str, list[JobStatus]] = {}
        for row in rows:
            if "_" in row.job_id:
                by_array.setdefault(row.job_id.split("_", 1)[0], []).append(row)
        out: dict[str, JobStatus] = {}
        missing: list[str] = []
        for job_id in ids:
            if job_id in by_id and job_id not in by_array:
                out[job_id] = by_id[job_id]
            elif job_id in by_array:
                out[job_id] = _aggregate(job_id, by_array[job_id], "squeue")
            else:
                missing.append(job_id)
        if missing:
            out.update(self._sacct(missing))
        for job_id in ids:
            out.setdefault(job_id, JobStatus(job_id, "", JobState.UNKNOWN, reason="not found"))
        return {job_id: out[job_id] for job_id in ids}

    def _squeue(self) -> list[JobStatus]:
        # --user rather than --me (added in 20.11) for older controllers; no -j (see above).
        user = pwd.getpwuid(os.getuid()).pw_name
        argv = [
            "squeue",
            f"--user={user}",
            "--states=all",
            "--noheader",
            "--array",
            "-O",
            SQUEUE_FORMAT,
        ]
        proc = self.runner(argv, env=submission_env())
        if proc.returncode != 0:
            raise SchedulerError(f"squeue failed: {error_line(proc.stderr, proc.stdout)}")
        rows: list[JobStatus] = []
        for line in proc.stdout.splitlines():
            parts = line.split("|", len(SQUEUE_FIELDS) - 1)
            if len(parts) != len(SQUEUE_FIELDS):
                continue
            job_id, _array_id, state, used, nodes, reason, exit_raw, restarts, name = parts
            name = name[:-1] if name.endswith("|") else name
            rows.append(
                JobStatus(
                    job_id=job_id.strip(),
                    name=name,
                    state=normalize_state(state),
                    elapsed=parse_elapsed(used),
                    nodes=nodes.strip(),
                    reason="" if reason.strip() == "None" else reason.strip(),
                    exit_code=_wait_status_to_exit(exit_raw.strip()),
                    restart_count=digits_or_none(restarts) or 0,
                    source="squeue",
                    raw_state=state.strip(),
                )
            )
        return rows

    def find_jobs_for_run(self, run_dir: str | os.PathLike[str]) -> list[str]:
        """Jobs whose batch script lies in ``run_dir``: squeue first, then accounting.

        squeue forgets a finished job after MinJobAge (300 s by default), so a driver that
        was down longer than that finds the job in sacct (by its working directory).
        ``AccountingUnavailable`` when squeue knows none and sacct fails: the controller has no
        such job queued or running, but one may have run and been forgotten.
        """
        user = pwd.getpwuid(os.getuid()).pw_name
        argv = ["squeue", f"--user={user}", "--states=all", "--noheader", "-o", "%i|%o"]
        proc = self.runner(argv, env=submission_env())
        if proc.returncode != 0:
            raise SchedulerError(f"squeue failed: {error_line(proc.stderr, proc.stdout)}")
        wanted = Path(run_dir).resolve()
        found: list[str] = []
        for line in proc.stdout.splitlines():
            job_id, _, command = line.partition("|")
            if command and Path(command.strip()).parent == wanted:
                _add_base_id(found, job_id)
        return found or self.jobs_in_accounting(wanted, user=user, strict=True)

    def jobs_in_accounting(
        self, run_dir: Path, *, user: str | None = None, strict: bool = False
    ) -> list[str]:
        """Accounting records of jobs that ran in ``run_dir``.

        Only jobs submitted since shortly before the run directory was created are asked for,
        so the query stays small on a busy site. When sacct fails the answer is empty, or with
        ``strict`` an ``AccountingUnavailable`` naming sacct's error.
        """
        try:
            since = time.localtime(run_dir.stat().st_mtime - 3600)
        except OSError:
            return []
        user = user or pwd.getpwuid(os.getuid()).pw_name
        argv = [
            "sacct", "-X", "--noheader", "--parsable2", f"--user={user}",
            f"--starttime={time.strftime('%Y-%m-%dT%H:%M:%S', since)}",
            "--format=JobID,WorkDir",
        ]  # fmt: skip
        proc = self.runner(argv, env=submission_env())
        if proc.returncode != 0:
            if strict:
                raise AccountingUnavailable(f"sacct failed: {error_line(proc.stderr, proc.stdout)}")
            return []  # accounting disabled or slurmdbd down: nothing more to learn
        found: list[str] = []
        for line in proc.stdout.splitlines():
            job_id, _, workdir = line.partition("|")
            if workdir and Path(workdir.strip()) == run_dir:
                _add_base_id(found, job_id)
        return found

    def _sacct(self, ids: list[str]) -> dict[str, JobStatus]:
        """Accounting records for ids the controller no longer knows (one call).

        When sacct itself fails every asked id gets a ``LOOKUP_FAILED`` status carrying the
        error, never silence: such a job may have run, and only accounting could say how.
        """
        wanted = [i for i in ids if is_job_ref(i)]
        if not wanted:
            return {}
        argv = [
            "sacct",
            "-X",
            "--noheader",
            "--parsable2",
            f"--jobs={','.join(wanted)}",
            f"--format={','.join(SACCT_FIELDS)}",
        ]
        proc = self.runner(argv, env=submission_env())
        if proc.returncode != 0:
            reason = f"sacct failed: {error_line(proc.stderr, proc.stdout)}"
            return {
                job_id: JobStatus(job_id, "", JobState.UNKNOWN, reason=reason, source=LOOKUP_FAILED)
                for job_id in wanted
            }
        rows: dict[str, JobStatus] = {}
        by_array: dict[str, list[JobStatus]] = {}
        for line in proc.stdout.splitlines():
            parts = line.split("|", len(SACCT_FIELDS) - 1)
            if len(parts) != len(SACCT_FIELDS):
                continue
            job_id, _raw, state, elapsed, nodes, exit_raw, reason, name = parts
            status = JobStatus(
                job_id=job_id,
                name=name,
                state=normalize_state(state),
                elapsed=parse_elapsed(elapsed),
                nodes="" if nodes == "None assigned" else nodes,
                reason="" if reason == "None" else reason,
                exit_code=_sacct_exit(exit_raw),
                source="sacct",
                raw_state=state,
            )
            rows[job_id] = status
            if "_" in job_id:
                by_array.setdefault(job_id.split("_", 1)[0], []).append(status)
        out: dict[str, JobStatus] = {}
        for job_id in wanted:
            if job_id in by_array:
                out[job_id] = _aggregate(job_id, by_array[job_id], "sacct")
            elif job_id in rows:
                out[job_id] = rows[job_id]
        return out

    # ------------------------------------------------------------------ control

    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        """Cancel active jobs; returns the ids signalled.

        Unknown ids -> ``NotFoundError``; ids the controller no longer lists whose accounting
        lookup failed -> ``SchedulerError`` (they are not running, but may not exist either).
        """
        ids = [str(i) for i in job_ids]
        statuses = self.status(ids)
        check_answered(statuses)
        active = [i for i, st in statuses.items() if not st.is_terminal]
        if active:
            proc = self.runner(["scancel", *active], env=submission_env())
            if proc.returncode != 0:
                raise SchedulerError(f"scancel failed: {error_line(proc.stderr, proc.stdout)}")
        return active

    def requeue(self, job_id: str) -> None:
        """``scontrol requeue``: NotFoundError for an unknown id, ConflictError when refused."""
        scontrol_requeue(str(job_id), run=self.runner, env=submission_env())


def _add_base_id(found: list[str], job_id: str) -> None:
    """Append an array task's base job id (or a plain id) once."""
    base_id = job_id.strip().split("_", 1)[0]
    if base_id and base_id not in found:
        found.append(base_id)
