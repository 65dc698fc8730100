"""The one small interface every scheduler backend implements.

``submit`` a script (the run directory is its working directory), ``status`` of many jobs in
one scheduler call, ``cancel``, ``requeue`` and ``wait``. Backends run external commands
through a :class:`CommandRunner` so that tests and benchmarks can count (or time) the real
calls by wrapping it, without mocking the scheduler.
"""

from __future__ import annotations

import os
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import NotFoundError, SchedulerError
from aimass_hpc.common.slurm_cli import CommandTimeout, run_command, submission_env
from aimass_hpc.common.slurm_states import JobState

# ``submission_env`` (the environment for a command run from inside a job) lives in
# common.slurm_cli, shared with the job side; re-exported here for the backends and the CLI.
__all__ = [
    "LOOKUP_FAILED",
    "AccountingUnavailable",
    "CommandRunner",
    "CommandTimeout",
    "CountingRunner",
    "JobStatus",
    "Scheduler",
    "WaitTimeout",
    "check_answered",
    "script_dir",
    "submission_env",
]

# ``JobStatus.source`` of a job the controller no longer lists and whose accounting lookup
# failed (slurmdbd down, or no accounting at all): it may have run, nobody can say how it ended.
LOOKUP_FAILED = "sacct-failed"
# Polls in a row ``wait`` accepts an unanswerable id before it gives up on it.
UNANSWERED_POLLS = 3


@dataclass(frozen=True)
class JobStatus:
    """What the scheduler knows about one job (or array task, ``123_4``)."""

    job_id: str
    name: str
    state: JobState
    elapsed: int | None = None  # seconds
    nodes: str = ""  # node list, e.g. node[1-2]
    reason: str = ""  # why pending / how it ended
    exit_code: int | None = None
    restart_count: int = 0
    source: str = ""  # which command said so: squeue, sacct, local; LOOKUP_FAILED: none could
    raw_state: str = ""
    array_tasks: dict[str, int] = field(default_factory=dict)  # array job: state -> task count

    @property
    def is_terminal(self) -> bool:
        return self.state.is_terminal

    @property
    def not_found(self) -> bool:
        """Every command that could know the job answered, and none of them does."""
        return self.state is JobState.UNKNOWN and not self.source

    @property
    def lookup_failed(self) -> bool:
        """The controller no longer lists the job and accounting could not be asked: the job
        may well have run (``reason`` holds the accounting error). Not the same as unknown."""
        return self.source == LOOKUP_FAILED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json`` output)."""
        data = asdict(self)
        data["state"] = self.state.value
        data["is_terminal"] = self.is_terminal
        return data


class CommandRunner:
    """Runs one external command; wrap it to count or time scheduler calls."""

    def __call__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: float | None = 60,
    ) -> subprocess.CompletedProcess[str]:
        return run_command(argv, env=env, cwd=cwd, timeout=timeout)


class CountingRunner(CommandRunner):
    """A runner that records every argv it runs (tests/benchmarks: "one call per poll")."""

    def __init__(self, inner: CommandRunner | None = None) -> None:
        self.inner = inner or CommandRunner()
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        return self.inner(argv, **kwargs)


class AccountingUnavailable(SchedulerError):
    """The accounting query (``sacct``) failed: slurmdbd is down or the site has none."""


class WaitTimeout(SchedulerError):
    """``wait`` ran out of time; ``statuses`` holds the last poll."""

    def __init__(self, message: str, statuses: dict[str, JobStatus]) -> None:
        super().__init__(message)
        self.statuses = statuses


def check_answered(statuses: Mapping[str, JobStatus]) -> None:
    """Raise for ids the scheduler could not account for.

    ``SchedulerError`` (exit 5) when an accounting lookup failed, since such a job may exist;
    ``NotFoundError`` (exit 3) only when every command answered and none knows the id.
    """
    failed = [st for st in statuses.values() if st.lookup_failed]
    if failed:
        ids = ", ".join(st.job_id for st in failed)
        raise SchedulerError(
            f"cannot tell what became of job(s) {ids}: no longer in the queue and "
            f"{failed[0].reason or 'the accounting lookup failed'}"
        )
    unknown = [st.job_id for st in statuses.values() if st.not_found]
    if unknown:
        raise NotFoundError(f"unknown job id(s): {', '.join(unknown)}")


class Scheduler(ABC):
    """A batch system backend."""

    name = "abstract"

    def __init__(self, runner: CommandRunner | None = None) -> None:
        self.runner = runner or CommandRunner()

    @abstractmethod
    def submit(
        self,
        script_path: str | os.PathLike[str],
        *,
        run_dir: str | os.PathLike[str],
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Queue ``script_path`` with ``run_dir`` as its working directory; returns the job id.

        ``extra_args`` go on the submit command line (plain scripts: ``--sbatch-arg``);
        ``env`` is added to the submission environment.
        """

    @abstractmethod
    def status(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Status of every id, in ONE scheduler call per poll (plus a fallback for forgotten
        jobs). Ids the scheduler has never heard of map to a status with ``UNKNOWN`` state."""

    @abstractmethod
    def cancel(self, job_ids: Iterable[str]) -> list[str]:
        """Cancel jobs; returns the ids that were still active (and got cancelled).

        ``NotFoundError`` naming any id the scheduler does not know; finished jobs are left
        alone.
        """

    @abstractmethod
    def requeue(self, job_id: str) -> None:
        """Put a job back in the queue (it keeps its id; ``restart_count`` goes up)."""

    def find_jobs_for_run(self, run_dir: str | os.PathLike[str]) -> list[str]:
        """Ids of queued or recent jobs whose batch script is ``run_dir``'s script.

        Recovers a submission whose id was never recorded (the submitter was killed while
        sbatch ran). Backends that cannot tell return an empty list.
        """
        return []

    def check_request(self, request: Any) -> None:  # noqa: B027 - optional hook
        """Refuse a (resolved) request this backend cannot run; InputError naming the field."""

    def test_submit(
        self, script_path: str | os.PathLike[str], *, run_dir: str | os.PathLike[str]
    ) -> str:
        """Ask the scheduler whether it would accept the script, without queueing it."""
        return "ok (no scheduler-side check for this backend)"

    def wait(
        self,
        job_ids: Iterable[str],
        timeout: float | None = None,
        *,
        poll: float = 2.0,
        on_poll: Any = None,
    ) -> dict[str, JobStatus]:
        """Poll until every job is terminal; returns the final statuses.

        Raises :class:`WaitTimeout` after ``timeout`` seconds. ``on_poll(statuses)`` is called
        after each poll (progress display). Polls start fast and back off to ``poll`` seconds.
        An id that stays unaccounted for (:func:`check_answered`) for a few polls ends the
        wait: ``NotFoundError`` when no command knows it, ``SchedulerError`` when the
        accounting lookup kept failing (the job may have run; we cannot say how it ended).
        """
        ids = list(dict.fromkeys(job_ids))
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = min(0.25, poll)
        unseen: dict[str, int] = {}
        while True:
            statuses = self.status(ids)
            if on_poll is not None:
                on_poll(statuses)
            if all(statuses[i].is_terminal for i in ids):
                return statuses
            # An id no command knows or can look up will never end here: say so, do not hang.
            for job_id in ids:
                st = statuses[job_id]
                unanswered = st.not_found or st.lookup_failed
                unseen[job_id] = unseen.get(job_id, 0) + 1 if unanswered else 0
            check_answered({i: statuses[i] for i, n in unseen.items() if n >= UNANSWERED_POLLS})
            if deadline is not None and time.monotonic() >= deadline:
                waiting = [i for i in ids if not statuses[i].is_terminal]
                raise WaitTimeout(
                    f"timed out after {timeout:.0f}s waiting for job(s) {', '.join(waiting)}",
                    statuses,
                )
            sleep = delay if deadline is None else max(0.0, min(delay, deadline - time.monotonic()))
            time.sleep(sleep)
            delay = min(poll, delay * 1.6)


def script_dir(script_path: str | os.PathLike[str]) -> Path:
    """Directory holding a script (used as a default working directory)."""
    return Path(script_path).resolve().parent
