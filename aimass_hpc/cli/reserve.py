"""``aimass reserve create|list|delete``: Slurm reservations for serving (site admins).

A thin wrapper over ``scontrol create|show|delete reservation``. Creating and deleting need
Slurm operator/admin rights; without them the command says so in one line instead of
passing on scontrol's message. Serve jobs use a reservation with
``aimass serve --reservation NAME`` or the site's ``serving.default_reservation``.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError
from aimass_hpc.common.names import RESERVATION_NAME, check_scontrol_value

_DENIED = ("access/permission denied", "invalid user id", "user is not authorized",
           "permission denied", "only slurmuser or root")  # fmt: skip


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


def _scontrol(args: list[str]) -> subprocess.CompletedProcess[str]:
    from aimass_hpc.launch.scheduler import submission_env

    try:
        return subprocess.run(
            ["scontrol", *args], capture_output=True, text=True, timeout=60,
            env=submission_env(),
        )  # fmt: skip
    except FileNotFoundError:
        raise SchedulerError("scontrol: command not found (is Slurm installed here?)") from None
    except subprocess.TimeoutExpired:
        raise SchedulerError("scontrol did not answer within 60s") from None


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


def _check(option: str, value: str | None) -> str | None:
    """``value`` when it may follow ``key=`` on scontrol's line (whole-string match)."""
    return None if value is None else check_scontrol_value(value, option)


@click.group()
def reserve() -> None:
    """Slurm reservations for model services (create and delete need admin rights)."""


@reserve.command()
@click.argument("name")
@click.option("--nodes", help="Node list, e.g. node[1-2].")
@click.option("--node-count", type=click.IntRange(min=1), help="Or: this many nodes.")
@click.option(
    "--partition", help="Partition the nodes come from (default: --site's serving partition)."
)
@site_option
@click.option(
    "--duration",
    default="60",
    show_default=True,
    help="Minutes, or Slurm time (1-00:00:00, UNLIMITED).",
)
@click.option("--start", default="now", show_default=True, help="Start time (Slurm syntax).")
@click.option("--users", help="Comma list of users (default: you).")
@click.option("--accounts", help="Comma list of accounts.")
@click.option("--flags", help="Slurm reservation flags, e.g. ignore_jobs.")
@click.option("--dry-run", is_flag=True, help="Print the scontrol command; run nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the reservation as JSON.")
def create(
    name: str,
    nodes: str | None,
    node_count: int | None,
    partition: str | None,
    site_ref: str | None,
    duration: str,
    start: str,
    users: str | None,
    accounts: str | None,
    flags: str | None,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Create reservation NAME (wraps `scontrol create reservation`).

    With --site, the partition defaults to the site's serving partition (its
    serving.partition), where `aimass serve` jobs run.
    """
    import getpass

    RESERVATION_NAME.check(name, "NAME")
    if site_ref is not None and partition is None:
        partition = _serving_partition(site_ref)
    if not nodes and not node_count:
        raise InputError("give --nodes LIST or --node-count N")
    if not users and not accounts:
        users = getpass.getuser()
    args = [
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
    if dry_run:
        click.echo(shlex.join(["scontrol", *args]))
        return
    proc = _scontrol(args)
    if proc.returncode != 0:
        raise explain_failure("create", name, proc.stderr or proc.stdout)
    shown = parse_reservations(_scontrol(["show", "reservation", name, "-o"]).stdout)
    if as_json:
        click.echo(json.dumps(shown[0] if shown else {"ReservationName": name}, indent=2))
    else:
        where = shown[0].get("Nodes", "?") if shown else "?"
        click.echo(f"reservation {name} created: nodes {where}")


def _serving_partition(site_ref: str) -> str | None:
    """The partition serve jobs of site ``site_ref`` use (None: Slurm's default)."""
    from aimass_hpc.config.site import load_site

    site = load_site(site_ref)
    if site.scheduler != "slurm":
        raise InputError(f"site {site.name} runs jobs without Slurm: it has no reservations")
    return site.serving.partition


@reserve.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """List reservations (wraps `scontrol show reservation`)."""
    proc = _scontrol(["show", "reservation", "-o"])
    if proc.returncode != 0:
        raise explain_failure("show", "*", proc.stderr or proc.stdout)
    rows = parse_reservations(proc.stdout)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no reservations")
        return
    table = Table(title="reservations")
    cols = ("ReservationName", "State", "Nodes", "StartTime", "EndTime", "Users", "Flags")
    for col in cols:
        table.add_column(col.replace("ReservationName", "name"))
    for row in rows:
        table.add_row(*(row.get(c, "") for c in cols))
    Console().print(table)


@reserve.command()
@click.argument("name")
def delete(name: str) -> None:
    """Delete reservation NAME (wraps `scontrol delete reservation`)."""
    RESERVATION_NAME.check(name, "NAME")
    proc = _scontrol(["delete", f"reservationname={name}"])
    if proc.returncode != 0:
        raise explain_failure("delete", name, proc.stderr or proc.stdout)
    click.echo(f"reservation {name} deleted")


def reservation_names(rows: list[dict[str, Any]]) -> list[str]:
    """Names in a parsed listing (for tests and scripts)."""
    return [r["ReservationName"] for r in rows]
