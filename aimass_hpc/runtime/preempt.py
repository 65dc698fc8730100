"""Preemption and time-limit warnings: a signal flag, and requeueing the job.

The handler only records that a signal arrived; the training loop polls :func:`requested`
at a step boundary, the ranks agree (allreduce of the flag), checkpoint, and rank 0 requeues.
Nothing here imports torch: ``python -m aimass_hpc.runtime`` installs the handler before the
heavy imports, because Slurm's warning can arrive while torch is still being imported.

Signals: the site's warning signal (default SIGUSR1, which neither NCCL nor MPI claims) is sent
by ``sbatch --signal=USR1@GRACE`` before the time limit; SIGTERM arrives when Slurm preempts,
requeues (``scontrol requeue``) or cancels the job. On the warning we requeue ourselves; on
SIGTERM whoever sent it decides (a preemptor with PreemptMode=REQUEUE or ``scontrol requeue``
puts the job back in the queue, ``scancel`` ends it), so we only checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from aimass_hpc.common import slurm_cli
from aimass_hpc.common.errors import AimassError, InputError, NotFoundError

DEFAULT_SIGNALS: tuple[str, ...] = ("USR1", "TERM")

# Flag state lives at module level: a signal handler must not allocate much or take locks.
_received: list[tuple[int, float]] = []
_installed: dict[int, object] = {}
_caught_up: list[threading.Thread] = []  # at most one check of the time left per process


def _handler(signum: int, frame: object) -> None:
    # Only record; the training loop acts on it at the next step boundary.
    _received.append((signum, time.monotonic()))


def parse_signal(name: str | int) -> int:
    """Turn ``"USR1"``, ``"SIGUSR1"``, ``"B:USR1"`` or ``10`` into a signal number."""
    return slurm_cli.parse_signal(name)


def install(signals: Iterable[str | int] = DEFAULT_SIGNALS) -> list[int]:
    """Install the flag-setting handler for ``signals`` (main thread only); idempotent.

    Call again after initialising MPI/NCCL: re-asserting the handler costs nothing and undoes
    a library that replaced it.
    """
    numbers = [parse_signal(s) for s in signals]
    for num in numbers:
        previous = signal.signal(num, _handler)
        if num not in _installed:
            _installed[num] = previous
    catch_up()
    return numbers


def catch_up(env: Mapping[str, str] | None = None, *, squeue: str = "squeue") -> None:
    """Act on a time-limit warning that came before this process listened for it.

    A training rank starts with the warning ignored (job.j2 does that, and says so with
    ``$AIMASS_HOLD_WARNING``): Slurm may send it while the rank is still starting (a limit
    close to the grace, a loaded node), and by default SIGUSR1 kills. Once the handler is
    installed, rank 0 asks Slurm for the time left (in the background, off the start-up
    path); within the grace (``$AIMASS_GRACE_SECONDS``) the warning was due already and is
    recorded as received. The ranks' stop vote is a maximum, so rank 0's record is enough.
    Once per process.
    """
    env = os.environ if env is None else env
    if _caught_up or env.get("AIMASS_HOLD_WARNING") != "1" or env.get("SLURM_PROCID", "0") != "0":
        return
    job = slurm_cli.job_ref_from_env(env)
    grace = slurm_cli.digits_or_none(env.get("AIMASS_GRACE_SECONDS"))
    warning = env.get("AIMASS_PREEMPT_SIGNAL")
    if job is None or grace is None or not warning:
        return
    try:
        warn = parse_signal(warning)
    except ValueError:
        return
    if warn not in _installed:
        return
    thread = threading.Thread(
        target=_check_time_left, args=(job, grace, warn, squeue), daemon=True, name="time-left"
    )
    _caught_up.append(thread)
    thread.start()


def _check_time_left(job: str, grace: int, warn: int, squeue: str) -> None:
    left = slurm_cli.time_left(job, squeue=squeue, timeout=60)
    if left is not None and left <= grace:
        print(
            f"aimass: the time-limit warning was due before this rank listened ({left} s left, "
            f"grace {grace} s): acting on it now",
            file=sys.stderr,
        )
        _received.append((warn, time.monotonic()))


def reinstall() -> None:
    """Re-assert the handler for every signal installed so far."""
    for num in list(_installed):
        signal.signal(num, _handler)


def uninstall() -> None:
    """Restore the handlers that were there before :func:`install` (tests)."""
    for num, previous in list(_installed.items()):
        signal.signal(num, previous if previous is not None else signal.SIG_DFL)  # type: ignore[arg-type]
    _installed.clear()


def requested() -> bool:
    """True once any installed signal arrived in this process."""
    return bool(_received)


def received() -> list[str]:
    """Names of the signals received so far, in order."""
    return [slurm_cli.signal_name(num) for num, _ in _received]


def reset() -> None:
    """Forget received signals (tests, or after acting on them)."""
    _received.clear()


def simulate(sig: str | int = "USR1") -> None:
    """Record ``sig`` as if it had arrived (tests and the runtime API's manual stop)."""
    _received.append((parse_signal(sig), time.monotonic()))


# Encoding for the allreduced flag: the maximum over ranks wins, so a warning on any rank
# (asks us to requeue) outranks a SIGTERM (someone else decides), which outranks nothing.
STOP_NONE, STOP_TERM, STOP_WARN = 0, 1, 2


def local_stop_code(warning_signal: str | int = "USR1") -> int:
    """This rank's vote: STOP_WARN if the warning signal came, STOP_TERM for any other."""
    if not _received:
        return STOP_NONE
    warn = parse_signal(warning_signal)
    return STOP_WARN if any(num == warn for num, _ in _received) else STOP_TERM


@dataclass(frozen=True)
class RequeueTarget:
    """Which job to requeue and how many restarts it has had."""

    job_id: str | None
    restart_count: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RequeueTarget:
        """The array-aware Slurm job id (``ARRAYJOB_TASK`` inside an array) from the env."""
        return cls(
            job_id=slurm_cli.job_ref_from_env(env),
            restart_count=slurm_cli.restart_count_from_env(env),
        )


# Reason prefix of a requeue refused because there is no Slurm job to requeue.
NOT_IN_SLURM = "not inside a Slurm job"


@dataclass(frozen=True)
class RequeueOutcome:
    """What :func:`requeue` did: ``requeued`` true only if scontrol accepted it."""

    requeued: bool
    reason: str


def requeue(
    target: RequeueTarget,
    max_restarts: int,
    *,
    scontrol: str = "scontrol",
    attempts: int = 3,
) -> RequeueOutcome:
    """Ask Slurm to requeue ``target`` unless it already restarted ``max_restarts`` times.

    Retries briefly: the controller can be busy exactly when many jobs get their warning.
    """
    if target.job_id is None:
        return RequeueOutcome(False, f"{NOT_IN_SLURM} (no SLURM_JOB_ID)")
    if target.restart_count >= max_restarts:
        return RequeueOutcome(
            False, f"restart limit reached, {target.restart_count} of {max_restarts}"
        )
    last = ""
    for attempt in range(attempts):
        try:
            slurm_cli.scontrol_requeue(target.job_id, scontrol=scontrol, timeout=60)
        except (InputError, NotFoundError) as exc:
            last = str(exc)
            break  # not an id, or one the controller does not know: asking again won't help
        except AimassError as exc:
            last = str(exc)
        else:
            return RequeueOutcome(True, f"requeued job {target.job_id}")
        if attempt + 1 < attempts:
            time.sleep(1.0 + attempt)
    print(f"aimass: scontrol requeue {target.job_id} failed: {last}", file=sys.stderr)
    return RequeueOutcome(False, f"scontrol requeue failed: {last}")


def job_state(job_id: str | None, *, scontrol: str = "scontrol") -> str | None:
    """Slurm's ``JobState`` of ``job_id`` (e.g. ``RUNNING``, ``PREEMPTED``), None if unknown."""
    if not job_id:
        return None
    try:
        proc = subprocess.run(
            [scontrol, "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_job_state(proc.stdout) if proc.returncode == 0 else None


def parse_job_state(text: str) -> str | None:
    """The ``JobState=`` value in ``scontrol show job -o`` output."""
    for token in text.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None
