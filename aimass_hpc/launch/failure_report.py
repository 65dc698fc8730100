"""How a finished job really ended: its ``result.json``, the first failing rank, its error.

Two questions a user asks of a finished job, answered from the run directory:

- **did it succeed?** Slurm's COMPLETED only says the batch shell exited 0. The runtime's
  ``result.json`` (``status`` in completed / requeued / stopped / failed, with a one-line
  ``reason`` whenever it is not completed) outranks it: a run that says it failed or stopped
  is FAILED, whatever the scheduler's state.
- **what went wrong?** When one rank raises, the others are killed (``--kill-on-bad-exit``)
  and the log holds every rank's interleaved tracebacks and transport noise. Training jobs
  label every line with its rank (``srun --label``: ``1: ...``; Open MPI's ``mpirun
  --tag-output``: ``[1,1]<stderr>:...``). srun's own lines (``srun: error: node1: task 1:
  Exited with exit code 1``) and mpirun's summary (``Process name: [[3108,1],1]`` / ``Exit
  code: 1``) name the failing tasks in order; the first one that exited by itself (not a peer
  killed with SIGKILL/SIGTERM, exit 137/143) is the culprit, and its own labelled lines hold
  its traceback.

Everything here but :func:`job_outcome` is a pure function of text.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from aimass_hpc.common.fsutil import read_json
from aimass_hpc.common.slurm_states import JobState
from aimass_hpc.launch.runs import RunDir
from aimass_hpc.launch.scheduler import JobStatus

# Exit codes of a process killed by SIGKILL / SIGTERM (128 + signal): peers that the launcher
# killed after the real failure, never the failure itself when another rank exited by itself.
_KILLED_CODES = frozenset({128 + 9, 128 + 15})
# How many lines of the failing rank's traceback a status shows.
TRACEBACK_LINES = 6

_SRUN_LABEL = re.compile(r"^\s*(?P<rank>[0-9]+): ?(?P<text>.*)\Z", re.ASCII | re.DOTALL)
_MPI_LABEL = re.compile(
    r"^\[[0-9]+,(?P<rank>[0-9]+)\]<(?:stdout|stderr|stddiag)>: ?(?P<text>.*)\Z",
    re.ASCII | re.DOTALL,
)
_SRUN_TASKS = re.compile(
    r"^srun: error: (?P<node>[^:\s]+): tasks? (?P<tasks>[0-9,\-]+): (?P<how>.+?)\s*\Z", re.ASCII
)
_SRUN_EXIT = re.compile(r"Exited with exit code (?P<code>[0-9]+)", re.ASCII)
_MPI_PROCESS = re.compile(r"^\s*Process name: \[\[[0-9]+,[0-9]+\],(?P<rank>[0-9]+)\]", re.ASCII)
_MPI_EXIT = re.compile(r"^\s*Exit code:\s*(?P<code>[0-9]+)", re.ASCII)
_RUNTIME_FAILED = re.compile(r"^aimass: rank (?P<rank>[0-9]+) failed:", re.ASCII)
_TRACEBACK = "Traceback (most recent call last):"
# Exception lines of a rank that lost a peer (the peer failed first): gloo, NCCL, MPI, Horovod.
_CONSEQUENCE = re.compile(
    r"Connection (?:closed|reset) by peer|remote worker|Broken pipe|DistBackendError"
    r"|ECONNRESET|Horovod has been shut down|MPI_ABORT|communicator was aborted"
    r"|(?:NCCL|Gloo) (?:error|communicator)",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class TaskEnd:
    """One task's end as the launcher reported it."""

    rank: int
    node: str = ""
    exit_code: int | None = None  # None: ended by a signal (``how`` says which)
    how: str = ""  # the launcher's words: "Exited with exit code 1", "Killed", "Terminated"

    @property
    def killed(self) -> bool:
        """Killed from outside (a peer of the real failure), not a failure of its own."""
        return self.exit_code is None or self.exit_code in _KILLED_CODES


@dataclass(frozen=True)
class RankFailure:
    """The first rank that failed by itself, and the end of its own traceback."""

    rank: int
    exit_code: int | None = None
    node: str = ""
    how: str = ""
    error: str = ""  # the exception line, e.g. "KeyError: 'missing'"
    traceback: list[str] = field(default_factory=list)  # its last lines, labels stripped

    def summary(self) -> str:
        """One line: ``rank 1 exited 1: KeyError: 'missing'``."""
        if self.exit_code is not None:
            text = f"rank {self.rank} exited {self.exit_code}"
        elif self.how:
            text = f"rank {self.rank} {self.how.lower()}"
        else:
            text = f"rank {self.rank} failed"
        return f"{text}: {self.error}" if self.error else text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def split_label(line: str) -> tuple[int, str] | None:
    """``(rank, text)`` of a rank-labelled log line (srun ``--label`` or mpirun
    ``--tag-output``), None for an unlabelled one (the batch shell's, srun's own)."""
    match = _MPI_LABEL.match(line) or _SRUN_LABEL.match(line)
    if match is None:
        return None
    return int(match.group("rank")), match.group("text")


def rank_lines(text: str, rank: int) -> list[str]:
    """The lines rank ``rank`` printed, in order, without their labels."""
    out = []
    for line in text.splitlines():
        labelled = split_label(line)
        if labelled is not None and labelled[0] == rank:
            out.append(labelled[1])
    return out


def _task_ranks(spec: str) -> list[int]:
    """``1`` / ``2-3`` / ``0,2-3`` (srun's task lists) as ranks."""
    ranks: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            ranks += range(int(low), int(high or low) + 1)
    return ranks


def task_ends(text: str) -> list[TaskEnd]:
    """Every failed task the launcher reported, in the order it reported them."""
    ends: list[TaskEnd] = []
    mpi_rank: int | None = None
    for line in text.splitlines():
        srun = _SRUN_TASKS.match(line)
        if srun is not None:
            how = srun.group("how")
            exited = _SRUN_EXIT.search(how)
            code = int(exited.group("code")) if exited else None
            for rank in _task_ranks(srun.group("tasks")):
                ends.append(TaskEnd(rank, srun.group("node"), code, how))
            continue
        process = _MPI_PROCESS.match(line)
        if process is not None:
            mpi_rank = int(process.group("rank"))
            continue
        code_line = _MPI_EXIT.match(line)
        if code_line is not None and mpi_rank is not None:
            mpi_code = int(code_line.group("code"))
            ends.append(TaskEnd(mpi_rank, "", mpi_code, f"Exited with exit code {mpi_code}"))
            mpi_rank = None
    return ends


def last_traceback(lines: list[str], limit: int = TRACEBACK_LINES) -> tuple[str, list[str]]:
    """``(exception line, last lines up to it)`` of the newest traceback in ``lines``.

    A traceback is ``Traceback (most recent call last):``, indented frame lines, then the
    exception line (the first unindented one). ``("", [])`` when there is none.
    """
    starts = [i for i, line in enumerate(lines) if line.strip() == _TRACEBACK]
    if not starts:
        return "", []
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1 :]:
        block.append(line)
        if line and not line[0].isspace():
            break  # the exception line
    error = block[-1].strip() if len(block) > 1 and not block[-1][:1].isspace() else ""
    return error, block[-limit:]


def is_consequence(error: str) -> bool:
    """Whether an exception line reads like a rank that lost a peer (transport noise: the
    peer's own failure came first), not a failure of its own."""
    return bool(_CONSEQUENCE.search(error))


def _last_traceback_at(text_lines: list[str], rank: int) -> int | None:
    """Index (in the whole log) where rank ``rank``'s fatal traceback starts: its runtime's
    last ``aimass: rank N failed:`` line, else its last ``Traceback`` line; None if neither."""
    failed_at = traceback_at = None
    for index, line in enumerate(text_lines):
        labelled = split_label(line)
        if labelled is None or labelled[0] != rank:
            continue
        body = labelled[1].strip()
        if _RUNTIME_FAILED.match(body):
            failed_at = index
        elif body == _TRACEBACK:
            traceback_at = index
    return failed_at if failed_at is not None else traceback_at


def first_failure(text: str, limit: int = TRACEBACK_LINES) -> RankFailure | None:
    """The first rank that failed by itself in a job's log, with its last traceback lines.

    Candidates are the tasks the launcher reports as failed by themselves (not peers killed
    after them), else every rank with a traceback. Among them: one whose error is not a lost
    peer (:func:`is_consequence`) over one whose is, then the one whose traceback comes first
    in the log (ranks that fail at once are reported together: ``tasks 0-1: Exited with exit
    code 1``), then the launcher's order. Unlabelled logs fall back to the runtime's ``aimass:
    rank N failed:`` line. None when the log names no failing rank.
    """
    lines = text.splitlines()
    ends = task_ends(text)
    own = [end for end in ends if not end.killed and end.exit_code != 0]
    candidates: list[TaskEnd] = own or ends
    if not candidates:
        seen: list[int] = []
        for line in lines:
            labelled = split_label(line)
            is_start = labelled is not None and labelled[1].strip() == _TRACEBACK
            if labelled is not None and is_start and labelled[0] not in seen:
                seen.append(labelled[0])
        candidates = [TaskEnd(rank) for rank in seen]
    if candidates:
        best: tuple[tuple[bool, float, int], RankFailure] | None = None
        for order, end in enumerate(candidates):
            error, tail = last_traceback(rank_lines(text, end.rank), limit)
            at = _last_traceback_at(lines, end.rank)
            key = (is_consequence(error), float("inf") if at is None else at, order)
            failure = RankFailure(end.rank, end.exit_code, end.node, end.how, error, tail)
            if best is None or key < best[0]:
                best = (key, failure)
        assert best is not None
        return best[1]
    for index, line in enumerate(lines):
        match = _RUNTIME_FAILED.match(line)
        if match is not None:
            error, tail = last_traceback(lines[index + 1 :], limit)
            return RankFailure(int(match.group("rank")), error=error, traceback=tail)
    return None


# ------------------------------------------------------------------ the outcome of a job

_NOT_A_SUCCESS = {"failed", "stopped", "requeued"}


@dataclass(frozen=True)
class Outcome:
    """What a job's status shows: the scheduler's state unless the run says otherwise."""

    state: str  # COMPLETED, FAILED, RUNNING, ... (FAILED where result.json says so)
    reason: str = ""
    scheduler_state: str = ""
    result_status: str | None = None
    failure: RankFailure | None = None

    @property
    def ok(self) -> bool:
        """The work ran and succeeded."""
        return self.state == JobState.COMPLETED.value

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``--json``, ``state.json``'s ``outcome``)."""
        return {
            "state": self.state,
            "reason": self.reason,
            "scheduler_state": self.scheduler_state,
            "result_status": self.result_status,
            "failure": self.failure.to_dict() if self.failure else None,
        }


def read_result(run: RunDir) -> dict[str, Any] | None:
    """The run's ``result.json`` as an object, None when absent or unreadable."""
    try:
        data = read_json(run.path / "result.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _result_reason(result: dict[str, Any]) -> str:
    status = str(result.get("status"))
    reason = result.get("reason")
    if isinstance(reason, str) and reason.strip():
        return " ".join(reason.split())  # one line, whatever the file holds
    return {
        "failed": "the run reports that it failed",
        "stopped": "the run was stopped before it finished",
        "requeued": "the run asked to be requeued, but the job ended",
    }.get(status, f"result.json says {status}")


def job_outcome(status: JobStatus, run: RunDir | None) -> Outcome:
    """The outcome a user is shown for ``status``, corrected by the run directory.

    A job Slurm calls COMPLETED whose (current) ``result.json`` says failed, stopped or
    requeued is FAILED with the run's reason; a FAILED job's reason names the first failing
    rank, its exit code and error, read from the latest restart's log.
    """
    base = Outcome(status.state.value, status.reason, status.state.value)
    if not status.is_terminal or run is None:
        return base
    result = read_result(run)
    restart = result.get("restart") if result else None
    if result is not None and isinstance(restart, int) and restart < status.restart_count:
        result = None  # written by an earlier attempt; the latest one did not write it
    result_status = str(result.get("status")) if result else None
    state, reason = status.state.value, status.reason
    if status.state is JobState.COMPLETED and result_status in _NOT_A_SUCCESS:
        assert result is not None
        state, reason = JobState.FAILED.value, _result_reason(result)
    elif result_status in _NOT_A_SUCCESS:
        assert result is not None
        reason = _result_reason(result)  # e.g. FAILED: "restart limit reached, 3 of 3, ..."
    failure = None
    if state == JobState.FAILED.value and status.state is not JobState.COMPLETED:
        task = status.job_id.partition("_")[2]  # an array task's own log
        failure = _log_failure(run, int(task) if task.isdigit() else None)
        # The run's own reason stays unless the log shows a rank's error.
        if failure is not None and (failure.error or result_status not in _NOT_A_SUCCESS):
            reason = failure.summary()
    return Outcome(state, reason, status.state.value, result_status, failure)


def settled_outcome(status: JobStatus, run: RunDir | None) -> Outcome:
    """:func:`job_outcome`; an ended job's outcome is also recorded in its run directory
    (``state.json``, written only when it changed)."""
    outcome = job_outcome(status, run)
    if run is not None and status.is_terminal:
        run.record_outcome(outcome.to_dict())
    return outcome


def _log_failure(run: RunDir, task: int | None = None) -> RankFailure | None:
    log = run.log_file(task=task)
    if log is None:
        return None
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return first_failure(text)
