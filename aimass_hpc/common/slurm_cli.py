"""THE facts about Slurm's command-line tools, used on the login node and inside jobs alike.

One home for what would otherwise be copied wherever a command is run:

* :func:`submission_env`: the environment for a command run from inside a job, without the
  job's ``SLURM_*``/``SBATCH_*``/``SRUN_*``/``SALLOC_*`` settings (``SLURM_CONF`` kept);
* :func:`parse_sbatch_parsable`: the job id in ``sbatch --parsable`` output (``ID[;CLUSTER]``);
* :func:`is_job_id` / :func:`is_job_ref`: ASCII-digit ids (``123``) and refs (``123_4``);
* :func:`scontrol_requeue`: ``scontrol requeue`` and what its errors mean;
* :func:`parse_signal`: ``USR1``, ``SIGUSR1``, ``B:USR1`` or ``10`` -> a signal number;
* :func:`job_ref_from_env` / :func:`restart_count_from_env`: who this job is, from Slurm's env.

Pure functions over the standard library only (the job side imports this before torch).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from aimass_hpc.common.errors import (
    AimassError,
    ConflictError,
    InputError,
    NotFoundError,
    SchedulerError,
)

# ---------------------------------------------------------------------------- environment

# Variables a job's tools read as defaults for a new submission or step; inside a job they
# describe the running allocation, so sbatch would copy them into the new job.
SCRUBBED_PREFIXES: tuple[str, ...] = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
# Which cluster to talk to: kept, or the command might reach another controller.
KEPT_VARS: frozenset[str] = frozenset({"SLURM_CONF"})


def in_job(env: Mapping[str, str] | None = None) -> bool:
    """True inside a Slurm job (``SLURM_JOB_ID``, or the older ``SLURM_JOBID``, is set)."""
    env = os.environ if env is None else env
    return "SLURM_JOB_ID" in env or "SLURM_JOBID" in env


def submission_env(
    extra: Mapping[str, str] | None = None, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment for a Slurm command: ours, minus a surrounding job's Slurm settings.

    Inside a job (see :func:`in_job`) sbatch would otherwise copy the parent's allocation
    (``SLURM_NTASKS``, ``SBATCH_*``...) into the new job. Outside a job nothing is removed: a
    user's own ``SBATCH_ACCOUNT`` on the login node is theirs to set. ``extra`` is added last.
    """
    env = dict(os.environ if environ is None else environ)
    if in_job(env):
        for key in list(env):
            if key.startswith(SCRUBBED_PREFIXES) and key not in KEPT_VARS:
                del env[key]
    env.update(extra or {})
    return env


# ------------------------------------------------------------------------------- job ids

# ``[0-9]`` rather than ``\d`` (which takes any Unicode digit), always with fullmatch (``$``
# would let a trailing newline through).
_JOB_ID_RE = re.compile(r"[0-9]+")
_JOB_REF_RE = re.compile(r"[0-9]+(?:_[0-9]+)?")
_PARSABLE_RE = re.compile(r"([0-9]+)(?:;([^;\s]+))?")


def is_job_id(text: str) -> bool:
    """``text`` is a plain Slurm job id: ASCII digits only (``123``)."""
    return isinstance(text, str) and _JOB_ID_RE.fullmatch(text) is not None


def is_job_ref(text: str) -> bool:
    """``text`` is a job id or an array task (``123`` or ``123_4``), ASCII digits only."""
    return isinstance(text, str) and _JOB_REF_RE.fullmatch(text) is not None


def digits_or_none(text: str | None) -> int | None:
    """``int(text)`` when ``text`` (stripped) is ASCII digits, else None (``int`` alone takes
    ``" 1_0"``, ``"١"``; ``isdigit`` takes ``"²"``, which ``int`` then refuses)."""
    if text is None:
        return None
    text = text.strip()
    return int(text) if _JOB_ID_RE.fullmatch(text) else None


class SbatchReply(NamedTuple):
    """What ``sbatch --parsable`` said: the job id, and the cluster on a federation."""

    job_id: str
    cluster: str | None


def sbatch_parsable_argv(script: str, options: Sequence[str] = ()) -> list[str]:
    """``sbatch --parsable OPTIONS SCRIPT``: the submission whose output
    :func:`parse_sbatch_parsable` reads."""
    return ["sbatch", "--parsable", *options, script]


def parse_sbatch_parsable(stdout: str | None) -> SbatchReply:
    """The job id in ``sbatch --parsable`` output: its last line, ``ID`` or ``ID;CLUSTER``.

    ``SchedulerError`` for anything else (no output, a non-ASCII digit, extra text): a job id
    that is not one would be passed on to squeue, scancel and file names.
    """
    lines = (stdout or "").strip().splitlines()
    match = _PARSABLE_RE.fullmatch(lines[-1].strip()) if lines else None
    if match is None:
        raise SchedulerError(f"sbatch printed no job id: {(stdout or '').strip()!r}")
    return SbatchReply(match.group(1), match.group(2))


# ------------------------------------------------------------------------------ commands

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


class CommandTimeout(SchedulerError):
    """A scheduler command did not answer in time and was killed.

    Unlike a refusal, the request may have reached the scheduler (``sbatch`` may have queued
    the job), so callers must look before they retry.
    """

    def __init__(self, argv: Sequence[str], timeout: float) -> None:
        super().__init__(f"{argv[0]} did not answer within {timeout:.0f}s")
        self.argv = list(argv)
        self.timeout = timeout


def run_command(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = 60,
) -> subprocess.CompletedProcess[str]:
    """Run one Slurm command, capturing text; a tool that is missing, cannot start or does not
    answer in ``timeout`` seconds is a SchedulerError (:class:`CommandTimeout` for the last)."""
    try:
        return subprocess.run(
            list(argv),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise SchedulerError(f"{argv[0]}: command not found (is Slurm installed here?)") from None
    except subprocess.TimeoutExpired:
        raise CommandTimeout(argv, timeout or 0.0) from None
    except OSError as exc:  # not executable, cwd gone, ...
        raise SchedulerError(f"{argv[0]}: {exc.strerror or exc}") from None


def error_line(stderr: str | None, stdout: str | None = "") -> str:
    """The last non-empty line of a failed command's stderr (else stdout): its message."""
    lines = [ln.strip() for ln in (stderr or stdout or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def requeue_argv(job_ref: str, scontrol: str = "scontrol") -> list[str]:
    """``scontrol requeue JOB``; InputError unless ``job_ref`` is ``ID`` or ``ID_TASK``."""
    if not is_job_ref(job_ref):
        raise InputError(f"job id: {job_ref!r} is not a Slurm job id (digits, or ID_TASK)")
    return [scontrol, "requeue", job_ref]


def requeue_error(job_ref: str, message: str) -> AimassError:
    """What a failed ``scontrol requeue`` means: NotFoundError for an id the controller does
    not know ("Invalid job id specified"), ConflictError otherwise (finished, not requeueable,
    not yours)."""
    if "Invalid job id" in message:
        return NotFoundError(f"unknown job id: {job_ref}")
    return ConflictError(f"cannot requeue job {job_ref}: {message}")


def scontrol_requeue(
    job_ref: str,
    *,
    run: Runner = run_command,
    env: Mapping[str, str] | None = None,
    scontrol: str = "scontrol",
    timeout: float = 60,
) -> None:
    """Put ``job_ref`` back in the queue (``scontrol requeue``); raises :func:`requeue_error`'s
    errors, or SchedulerError when scontrol is missing or does not answer.

    ``run`` has :func:`run_command`'s signature (the login side passes its counting runner).
    """
    proc = run(requeue_argv(str(job_ref), scontrol), env=env, timeout=timeout)
    if proc.returncode != 0:
        raise requeue_error(str(job_ref), error_line(proc.stderr, proc.stdout))


# ------------------------------------------------------------------------------- signals


def parse_signal(name: str | int) -> int:
    """``"USR1"``, ``"SIGUSR1"``, ``"B:USR1"`` (``--signal``'s batch-shell form), ``"10"`` or
    ``10`` -> the signal number on this host. ValueError for anything else."""
    if isinstance(name, bool):
        raise ValueError(f"unknown signal {name!r}")
    if isinstance(name, int):
        number = name
    else:
        text = str(name).strip().upper().removeprefix("B:")
        if _JOB_ID_RE.fullmatch(text):
            number = int(text)
        else:
            try:
                return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
            except KeyError:
                raise ValueError(f"unknown signal {name!r}") from None
    # valid_signals() includes the real-time ones, which Signals does not name.
    if number not in signal.valid_signals():
        raise ValueError(f"unknown signal {name!r}")
    return number


def signal_name(number: int) -> str:
    """``10`` -> ``"SIGUSR1"``; a signal without a name (real-time) -> its number as text."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


# ---------------------------------------------------------------------------- this job


def job_ref_from_env(env: Mapping[str, str] | None = None) -> str | None:
    """This job as squeue/scancel/scontrol name it: ``ARRAYJOB_TASK`` inside an array task,
    else ``SLURM_JOB_ID``; None outside a job."""
    env = os.environ if env is None else env
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def time_left(job_ref: str, *, squeue: str = "squeue", timeout: float = 30) -> int | None:
    """Seconds until ``job_ref`` reaches its time limit, as Slurm counts them (``squeue
    %L``); None when Slurm does not answer, does not know the job, or it has no limit."""
    from aimass_hpc.common.timelimit import parse_elapsed

    try:
        proc = run_command([squeue, "-h", "-j", job_ref, "-o", "%L"], timeout=timeout)
    except AimassError:
        return None
    lines = proc.stdout.strip().splitlines()
    return parse_elapsed(lines[0]) if proc.returncode == 0 and lines else None


def restart_count_from_env(env: Mapping[str, str] | None = None) -> int:
    """How often Slurm has restarted this job (``SLURM_RESTART_COUNT``; 0 when unset)."""
    env = os.environ if env is None else env
    return digits_or_none(env.get("SLURM_RESTART_COUNT")) or 0
