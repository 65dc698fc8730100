"""Slurm reservations for serving: ``scontrol create|show|delete reservation``.

The work behind ``aimass reserve``. Creating and deleting need Slurm operator/admin rights;
without them the error says so in one line instead of passing on scontrol's message. Serve
jobs use a reservation with ``aimass serve --reservation NAME`` or the site's
``serving.default_reservation``.
"""

from __future__ import annotations

import getpass
import subprocess
from typing import Any

from aimass_hpc.common import slurm_cli
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.common.names import RESERVATION_NAME, check_scontrol_value

_DENIED = ("access/permission denied", "invalid user id", "user is not authorized",
           "permission denied", "only slurmuser or root")  # fmt: skip

# Columns of the ``aimass reserve list`` table, in scontrol's own names.
LIST_COLUMNS = ("ReservationName", "State", "Nodes", "StartTime", "EndTime", "Users", "Flags")


def explain_failure(action: str, name: str, message: str) -> Exception:
    """The one-line error for a failed scontrol call (admin rights, unknown name, ...)."""
    text = message.strip().splitlines()[-1] if message.strip() else "no output"
    low = text.lower()
    if any(word in low for word in _DENIED):
        return ConflictError(
            f"{action} reservation {name!r} needs Slurm operator or admin rights "
            f"(scontrol: {text}); ask your site admins"
        )
    if "invalid" in low and action == "delete":
        return NotFoundError(f"no reservation {name!r} (scontrol: {text})")
    if "overlaps" in low or "duplicate" in low:
        return ConflictError(f"reservation {name!r}: {text}")
    return SchedulerError(f"scontrol {action} reservation {name!r} failed: {text}")


def parse_reservations(text: str) -> list[dict[str, str]]:
    """``scontrol show reservation -o`` lines -> one dict per reservation."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("ReservationName="):
            continue
        fields: dict[str, str] = {}
        for item in line.split():
            key, sep, value = item.partition("=")
            if sep:
                fields[key] = value
        out.append(fields)
    return out


def reservation_names(rows: list[dict[str, Any]]) -> list[str]:
    """Names in a parsed listing (for tests and scripts)."""
    return [r["ReservationName"] for r in rows]


def serving_partition(site_ref: str) -> str | None:
    """The partition serve jobs of site ``site_ref`` use (None: Slurm's default)."""
    from aimass_hpc.config.site import load_site

    site = load_site(site_ref)
    if site.scheduler != "slurm":
        raise InputError(f"site {site.name} runs jobs without Slurm: it has no reservations")
    return site.serving.partition


def _check(option: str, value: str | None) -> str | None:
    """``value`` when it may follow ``key=`` on scontrol's line (whole-string match)."""
    return None if value is None else check_scontrol_value(value, option)


def create_argv(
    name: str,
    *,
    nodes: str | None = None,
    node_count: int | None = None,
    partition: str | None = None,
    site_ref: str | None = None,
    duration: str = "60",
    start: str = "now",
    users: str | None = None,
    accounts: str | None = None,
    flags: str | None = None,
) -> list[str]:
    """The exact ``scontrol create reservation ...`` command for reservation ``name``.

    Every value is checked first (one-line InputError naming the option). With ``site_ref``
    and no ``partition``, the partition is the site's serving partition; with neither
    ``users`` nor ``accounts``, the reservation is for the current user.
    """
    RESERVATION_NAME.check(name, "NAME")
    if site_ref is not None and partition is None:
        partition = serving_partition(site_ref)
    if not nodes and not node_count:
        raise InputError("give --nodes LIST or --node-count N")
    if not users and not accounts:
        users = getpass.getuser()
    args = [
        "scontrol",
        "create",
        "reservation",
        f"reservationname={name}",
        f"starttime={_check('--start', start)}",
        f"duration={_check('--duration', duration)}",
    ]
    for key, value in (
        ("nodes", nodes),
        ("nodecnt", node_count),
        ("partitionname", partition),
        ("users", users),
        ("accounts", accounts),
        ("flags", flags),
    ):
        if value is not None:
            args.append(f"{key}={_check('--' + key, str(value))}")  # fmt: skip
    return args


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    # submission_env: run from inside a job, scontrol must not act on the job's SLURM_* settings.
    return slurm_cli.run_command(argv, env=slurm_cli.submission_env(), timeout=60)


def _scontrol(args: list[str]) -> subprocess.CompletedProcess[str]:
    return _run(["scontrol", *args])


def create_reservation(name: str, argv: list[str]) -> dict[str, str]:
    """Run ``argv`` (from :func:`create_argv` for ``name``); the new reservation as scontrol
    shows it (only its name when scontrol shows nothing)."""
    proc = _run(argv)
    if proc.returncode != 0:
        raise explain_failure("create", name, proc.stderr or proc.stdout)
    shown = parse_reservations(_scontrol(["show", "reservation", name, "-o"]).stdout)
    return shown[0] if shown else {"ReservationName": name}


def list_reservations() -> list[dict[str, str]]:
    """Every reservation, one dict of scontrol's fields each."""
    proc = _scontrol(["show", "reservation", "-o"])
    if proc.returncode != 0:
        raise explain_failure("show", "*", proc.stderr or proc.stdout)
    return parse_reservations(proc.stdout)


def delete_reservation(name: str) -> None:
    """Delete reservation ``name`` (NotFoundError when Slurm has none by that name)."""
    RESERVATION_NAME.check(name, "NAME")
    proc = _scontrol(["delete", f"reservationname={name}"])
    if proc.returncode != 0:
        raise explain_failure("delete", name, proc.stderr or proc.stdout)
