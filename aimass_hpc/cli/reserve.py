"""``aimass reserve create|list|delete``: Slurm reservations for serving (site admins).

A thin wrapper over ``scontrol create|show|delete reservation``; the work is in
``aimass_hpc.launch.reservations``. Creating and deleting need Slurm operator/admin rights;
without them the command says so in one line instead of passing on scontrol's message. Serve
jobs use a reservation with ``aimass serve --reservation NAME`` or the site's
``serving.default_reservation``.
"""

from __future__ import annotations

import json
import shlex

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.launch import reservations as R

# Re-exported: tests and scripts import these from here.
from aimass_hpc.launch.reservations import (  # noqa: F401
    explain_failure,
    parse_reservations,
    reservation_names,
)


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
    argv = R.create_argv(
        name,
        nodes=nodes,
        node_count=node_count,
        partition=partition,
        site_ref=site_ref,
        duration=duration,
        start=start,
        users=users,
        accounts=accounts,
        flags=flags,
    )
    if dry_run:
        click.echo(shlex.join(argv))
        return
    shown = R.create_reservation(name, argv)
    if as_json:
        click.echo(json.dumps(shown, indent=2))
    else:
        click.echo(f"reservation {name} created: nodes {shown.get('Nodes', '?')}")


@reserve.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(as_json: bool) -> None:
    """List reservations (wraps `scontrol show reservation`)."""
    rows = R.list_reservations()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no reservations")
        return
    table = Table(title="reservations")
    cols = R.LIST_COLUMNS
    for col in cols:
        table.add_column(col.replace("ReservationName", "name"))
    for row in rows:
        table.add_row(*(row.get(c, "") for c in cols))
    Console().print(table)


@reserve.command()
@click.argument("name")
def delete(name: str) -> None:
    """Delete reservation NAME (wraps `scontrol delete reservation`)."""
    R.delete_reservation(name)
    click.echo(f"reservation {name} deleted")
