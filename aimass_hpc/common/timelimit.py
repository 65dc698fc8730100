"""Slurm time limits and durations: THE one parser and formatter.

Slurm writes durations (``--time``, ``MaxTime``, squeue's elapsed ``%M``, sacct's ``Elapsed``)
in one family of formats::

    MM            minutes            (sbatch --time only)
    MM:SS         minutes:seconds
    HH:MM:SS
    D-HH          days-hours
    D-HH:MM
    D-HH:MM:SS

plus ``UNLIMITED`` / ``INFINITE`` (no limit) and squeue's ``INVALID`` / ``N/A``. Everything in
aimass that reads or writes one of these goes through here so that "5" always means 5 minutes
and "1-0" always means a day.
"""

from __future__ import annotations

import re

UNLIMITED_WORDS = frozenset({"UNLIMITED", "INFINITE", "INFINITY", "PARTITION_LIMIT"})

_PATTERNS = tuple(
    # (regex, field names) in the order Slurm documents them. ASCII digits only (``\d`` would
    # take any script's digits, which Slurm does not); ``\Z``, not ``$``, which would let a
    # trailing newline through.
    (re.compile(pattern, re.ASCII), fields)
    for pattern, fields in (
        (r"^(?P<m>\d+)\Z", ("m",)),
        (r"^(?P<m>\d+):(?P<s>\d+)\Z", ("m", "s")),
        (r"^(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)(?:\.\d+)?\Z", ("h", "m", "s")),
        (r"^(?P<d>\d+)-(?P<h>\d+)\Z", ("d", "h")),
        (r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+)\Z", ("d", "h", "m")),
        (r"^(?P<d>\d+)-(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)(?:\.\d+)?\Z", ("d", "h", "m", "s")),
    )
)

_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}


class TimeLimitError(ValueError):
    """A string that is not a Slurm time limit (message says which forms are accepted)."""


def parse_time(value: str | int, *, allow_unlimited: bool = True) -> int | None:
    """Parse a Slurm time string into seconds; ``None`` means unlimited.

    An ``int`` is taken as minutes (what ``--time=N`` means). Raises :class:`TimeLimitError`
    for anything else, including negative numbers and a seconds/minutes field above 59 in
    the multi-field forms (Slurm itself rejects "1:75").
    """
    if isinstance(value, bool):
        raise TimeLimitError(f"not a time limit: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise TimeLimitError(f"time limit must not be negative: {value}")
        return value * 60
    text = str(value).strip()
    if text.upper() in UNLIMITED_WORDS:
        if not allow_unlimited:
            raise TimeLimitError(f"an explicit time limit is needed here, not {text!r}")
        return None
    for pattern, fields in _PATTERNS:
        match = pattern.match(text)
        if not match:
            continue
        parts = {name: int(match.group(name)) for name in fields}
        # The leading field may be large (e.g. 90 minutes, 36 hours); later ones are clock digits.
        for name in fields[1:]:
            limit = 23 if name == "h" else 59
            if parts[name] > limit:
                raise TimeLimitError(f"{text!r}: the {_FIELD_WORD[name]} field is above {limit}")
        return sum(_UNIT_SECONDS[name] * parts[name] for name in fields)
    raise TimeLimitError(
        f"not a Slurm time: {text!r} (use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)"
    )


_FIELD_WORD = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}


def check_time(value: str | None) -> str | None:
    """Field validator: ``value`` unchanged when it is a valid Slurm time limit (or None).

    Raises :class:`TimeLimitError` (a ``ValueError``, so pydantic reports it by key path).
    """
    if value is not None:
        parse_time(value)
    return value


def parse_elapsed(value: str) -> int | None:
    """Parse an elapsed/limit column from squeue or sacct; ``None`` when it has no value."""
    text = (value or "").strip()
    if not text or text.upper() in {"INVALID", "N/A", "NONE", "UNKNOWN"} | UNLIMITED_WORDS:
        return None
    try:
        seconds = parse_time(text)
    except TimeLimitError:
        return None
    # A lone number in an elapsed column is never printed by Slurm; keep the parse anyway.
    return seconds


def format_time(seconds: int | None) -> str:
    """Format seconds the way ``sbatch --time`` accepts and Slurm prints (``D-HH:MM:SS``).

    ``None`` formats as ``UNLIMITED``. Under a day the day part is left out (``HH:MM:SS``).
    """
    if seconds is None:
        return "UNLIMITED"
    if seconds < 0:
        raise TimeLimitError(f"duration must not be negative: {seconds}")
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{hours:02d}:{minutes:02d}:{secs:02d}"


def format_elapsed(seconds: int | None) -> str:
    """A compact human form for tables: ``42s``, ``3m05s``, ``2h01m``, ``1d04h``; ``-`` if None."""
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"
