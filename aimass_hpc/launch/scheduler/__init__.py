"""Scheduler backends behind one interface (:class:`~aimass_hpc.launch.scheduler.base.Scheduler`).

``get_scheduler(site)`` returns the backend the site config names: ``slurm`` (command-line
tools, the default) or ``local`` (subprocesses, for debugging). A pyslurm backend is possible
but not provided: PyPI's pyslurm needs Slurm >= 25.11 (or <= 18.08) headers, and the Slurm we
test against is 22.05.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aimass_hpc.common.slurm_states import JobState, normalize_state
from aimass_hpc.launch.scheduler.base import (
    LOOKUP_FAILED,
    AccountingUnavailable,
    CommandRunner,
    CommandTimeout,
    CountingRunner,
    JobStatus,
    Scheduler,
    WaitTimeout,
    check_answered,
    submission_env,
)

if TYPE_CHECKING:
    from aimass_hpc.config.site import Site

__all__ = [
    "LOOKUP_FAILED",
    "AccountingUnavailable",
    "CommandRunner",
    "CommandTimeout",
    "CountingRunner",
    "JobState",
    "JobStatus",
    "Scheduler",
    "WaitTimeout",
    "check_answered",
    "get_scheduler",
    "normalize_state",
    "submission_env",
]


def get_scheduler(site: Site, runner: CommandRunner | None = None) -> Scheduler:
    """The scheduler backend for ``site`` (``runner`` wraps its external commands)."""
    if site.scheduler == "local":
        from aimass_hpc.launch.scheduler.local import LocalScheduler

        return LocalScheduler(site.runs_root / ".local-jobs", runner=runner)
    from aimass_hpc.launch.scheduler.slurm import SlurmScheduler

    return SlurmScheduler(runner=runner)
