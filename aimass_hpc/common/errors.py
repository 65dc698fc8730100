"""User-facing errors.

Every error a user can cause (bad spec, bad site config, unknown job or model) is an
``AimassError``. The CLI prints it as one line and exits with its ``exit_code``; library
callers catch it like any exception. Internal bugs stay ordinary exceptions (tracebacks).

Exit codes (stable, scripts rely on them):
  0 ok, 1 the work ran and failed, 2 bad input, 3 not found, 4 conflict / wrong state,
  5 scheduler or system failure, 6 integrity failure (checksum, truncated file).
"""

from __future__ import annotations


class AimassError(Exception):
    """Base class: a message for the user and an exit code."""

    exit_code = 1


class InputError(AimassError):
    """Bad input: a spec field, a config key, a CLI argument. Message names where."""

    exit_code = 2


class NotFoundError(AimassError):
    """An unknown job id, run, site, model, version or alias."""

    exit_code = 3


class ConflictError(AimassError):
    """The request is valid but the current state forbids it."""

    exit_code = 4


class SchedulerError(AimassError):
    """The scheduler (or another system command) failed."""

    exit_code = 5


class IntegrityError(AimassError):
    """Stored data failed a check: a checksum mismatch, a truncated file."""

    exit_code = 6
