"""Facts about a process from Linux's ``/proc/PID/stat``; None where /proc cannot tell."""

from __future__ import annotations

import os
import time


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3 onward of ``/proc/PID/stat`` (state, ppid, ...), or None if unreadable.

    The command name (field 2) may hold spaces and parentheses: split after its last ``)``.
    """
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields or None


def state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (``R``, ``S``, ``Z``...), or None if it is gone."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (identifies it across pid reuse)."""
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def age_s(pid: int | None = None) -> float | None:
    """Seconds since ``pid`` (default: this process) started, to a clock tick (10 ms)."""
    ticks = start_ticks(os.getpid() if pid is None else pid)
    if ticks is None:
        return None
    # Both on the boot-time clock: precise, unlike /proc/stat's btime (whole seconds).
    return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
