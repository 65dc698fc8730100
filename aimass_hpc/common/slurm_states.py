"""THE table of job states: every scheduler state string maps to one :class:`JobState` here.

Slurm prints states long (``squeue %T``, ``sacct State``: ``CANCELLED by 0``) or short (``%t``:
``PD``, ``CG``...). Anything we do not know maps to ``UNKNOWN`` (never terminal), so a new
Slurm state makes ``wait`` keep polling rather than report a finished job.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Normalised job states (Slurm's own long names, so they read naturally)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"
    NODE_FAIL = "NODE_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        """The job will not run (again) by itself."""
        return self in TERMINAL

    @property
    def is_active(self) -> bool:
        """Queued or holding resources."""
        return not self.is_terminal and self is not JobState.UNKNOWN

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.CANCELLED,
        JobState.TIMEOUT,
        JobState.PREEMPTED,
        JobState.NODE_FAIL,
        JobState.OUT_OF_MEMORY,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
    }
)

# (long name, short code) -> normalised state. Requeue/hold states are PENDING: the job is
# waiting to run again (its reason column says why).
_TABLE: dict[str, tuple[str, JobState]] = {
    "PENDING": ("PD", JobState.PENDING),
    "REQUEUED": ("RQ", JobState.PENDING),
    "REQUEUE_HOLD": ("RH", JobState.PENDING),
    "REQUEUE_FED": ("RF", JobState.PENDING),
    "RESV_DEL_HOLD": ("RD", JobState.PENDING),
    "SPECIAL_EXIT": ("SE", JobState.PENDING),
    "CONFIGURING": ("CF", JobState.CONFIGURING),
    "RUNNING": ("R", JobState.RUNNING),
    "RESIZING": ("RS", JobState.RUNNING),
    "SIGNALING": ("SI", JobState.RUNNING),
    "STAGE_OUT": ("SO", JobState.COMPLETING),
    "SUSPENDED": ("S", JobState.SUSPENDED),
    "STOPPED": ("ST", JobState.SUSPENDED),
    "COMPLETING": ("CG", JobState.COMPLETING),
    "COMPLETED": ("CD", JobState.COMPLETED),
    "FAILED": ("F", JobState.FAILED),
    "CANCELLED": ("CA", JobState.CANCELLED),
    "REVOKED": ("RV", JobState.CANCELLED),
    "TIMEOUT": ("TO", JobState.TIMEOUT),
    "PREEMPTED": ("PR", JobState.PREEMPTED),
    "NODE_FAIL": ("NF", JobState.NODE_FAIL),
    "OUT_OF_MEMORY": ("OOM", JobState.OUT_OF_MEMORY),
    "BOOT_FAIL": ("BF", JobState.BOOT_FAIL),
    "DEADLINE": ("DL", JobState.DEADLINE),
}
_BY_NAME: dict[str, JobState] = {}
for _long, (_short, _state) in _TABLE.items():
    _BY_NAME[_long] = _state
    _BY_NAME[_short] = _state


def normalize_state(raw: str) -> JobState:
    """Map a scheduler state string (``RUNNING``, ``CA``, ``CANCELLED by 1000``, ``COMPLETED+``)."""
    text = (raw or "").strip().upper()
    if not text:
        return JobState.UNKNOWN
    word = text.split()[0].rstrip("+*")
    return _BY_NAME.get(word, JobState.UNKNOWN)


def aggregate_state(states: list[JobState]) -> JobState:
    """One state for a job made of several (array tasks): active beats failed beats completed."""
    if not states:
        return JobState.UNKNOWN
    for state in (
        JobState.RUNNING,
        JobState.COMPLETING,
        JobState.CONFIGURING,
        JobState.SUSPENDED,
        JobState.PENDING,
        JobState.UNKNOWN,
    ):
        if state in states:
            return state
    for state in states:
        if state is not JobState.COMPLETED:
            return state
    return JobState.COMPLETED
