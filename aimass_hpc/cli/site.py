"""``aimass site``: check, list and show site configs (for site admins).

Thin: the checking is in ``aimass_hpc.launch.site_check``.
"""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.common.errors import AimassError, InputError
from aimass_hpc.config.site import list_sites, load_site


@click.group()
def site() -> None:
    """Site configs: what a cluster offers and how jobs run there."""


def _one_ref(ref: str | None, site_ref: str | None) -> str | None:
    """The site named by the REF argument or by --site (they may not disagree)."""
    if ref is not None and site_ref is not None and ref != site_ref:
        raise InputError(f"two sites given: {ref!r} and --site {site_ref!r}; give one")
    return ref if ref is not None else site_ref


@site.command("check")
@click.argument("ref", required=False, metavar="[NAME|PATH]")
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
@click.option(
    "--live/--no-live",
    "live",
    default=None,
    help="Compare with the cluster here (sinfo, scontrol, sacctmgr, srun): --live insists "
    "(exit 5 when the scheduler does not answer); default: only when it answers within 5 s.",
)
def check(ref: str | None, site_ref: str | None, as_json: bool, live: bool | None) -> None:
    """Validate a site config FILE or NAME: every problem, with its key path and a hint.

    The site is the argument, or --site, or $AIMASS_SITE.

    Names and values are checked first (a bad value is reported at its own key, e.g.
    `partitions.gpu.gpu_type`); a valid config is then rendered through every job template and
    checked with `bash -n` (and shellcheck, when installed). Then, unless --no-live, it is
    compared with the cluster: partitions, GPUs/gres, CPUs, memory, time limits, features,
    your accounts and QOS, the serving reservation and srun's MPI types (e.g.
    `partitions.gpu.gpus_per_node: config says 8, cluster nodes of partition gpu have 4`).
    Exits non-zero when anything is wrong.
    """
    from aimass_hpc.launch.site_check import check_site  # jinja2: only for check

    result = check_site(_one_ref(ref, site_ref))
    path, problems = result.path, list(result.problems)
    live_ran = False
    if live is not False:
        from aimass_hpc.launch.site_live import live_check

        found = live_check(path, required=live is True)
        problems += found.problems
        live_ran = found.ran
        for note in found.notes:  # one line each; stderr keeps --json output parseable
            click.echo(f"{path}: {note}", err=as_json)
    if as_json:
        click.echo(json.dumps([p.__dict__ for p in problems], indent=2))
    else:
        for problem in problems:
            click.echo(f"{path}: {problem}")
    if problems:
        raise InputError(f"{len(problems)} problem(s) in site config {path}")
    if not as_json:
        live_text = "; matches the cluster" if live_ran else ""
        click.echo(
            f"{path}: ok (config valid; job, train, trial and serve templates render{live_text})"
        )


@site.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_cmd(as_json: bool) -> None:
    """Sites visible by name (~/.config/aimass/sites, /etc/aimass/sites, bundled)."""
    rows: list[dict[str, Any]] = []
    for name, path in list_sites():
        try:
            obj = load_site(str(path))
            rows.append(
                {
                    "name": name,
                    "scheduler": obj.scheduler,
                    "description": obj.description,
                    "path": str(path),
                    "valid": True,
                }
            )
        except AimassError:
            rows.append(
                {
                    "name": name,
                    "scheduler": "?",
                    "description": "(invalid: run site check)",
                    "path": str(path),
                    "valid": False,
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "scheduler", "description", "path")
    for row in rows:
        table.add_row(row["name"], row["scheduler"], row["description"], row["path"])
    Console().print(table)


@site.command("show")
@click.argument("ref", required=False, metavar="[NAME|PATH]")
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the resolved config as JSON.")
def show(ref: str | None, site_ref: str | None, as_json: bool) -> None:
    """Show a site's resolved config (defaults filled, paths expanded).

    The site is the argument, or --site, or $AIMASS_SITE.
    """
    obj = load_site(_one_ref(ref, site_ref))
    data = obj.model_dump(mode="json")
    data["source"] = obj.source
    data["templates_overridden"] = obj.template_overrides()
    for name, part in obj.partitions.items():
        data["partitions"][name]["effective"] = {  # what a job there gets by default
            "account": part.account or obj.account,
            "qos": part.qos or obj.qos,
            "constraint": "&".join(part.constraints or obj.constraints) or None,
        }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    console.print(f"[bold]{obj.name}[/bold]: {obj.description}  ({obj.source})")
    console.print(f"scheduler {obj.scheduler}, account {obj.account or '-'}, qos {obj.qos or '-'}")
    table = Table(
        "partition", "default", "nodes", "GPUs/node", "gres", "CPUs", "mem", "max time",
        "account", "qos",
    )  # fmt: skip
    for part in obj.partitions.values():
        gres = part.gpu_gres(part.gpus_per_node) if part.gpus_per_node else "-"
        effective = data["partitions"][part.name]["effective"]
        table.add_row(
            part.name,
            "*" if part is obj.default_partition else "",
            str(part.nodes or "?"),
            str(part.gpus_per_node),
            gres,
            str(part.cpus_per_node),
            part.mem_per_node or "-",
            part.max_time,
            effective["account"] or "-",
            effective["qos"] or "-",
        )
    console.print(table)
    overridden = data["templates_overridden"]
    console.print(
        f"[bold]templates[/bold]: {', '.join(overridden)} overridden from {obj.template_dir}"
        if overridden
        else "[bold]templates[/bold]: bundled (no overrides)"
    )
    for section in (
        "modules",
        "container",
        "mpi",
        "filesystems",
        "preemption",
        "training",
        "serving",
    ):
        console.print(f"[bold]{section}[/bold]: {json.dumps(data[section])}")
    if obj.env:
        console.print(f"[bold]env[/bold]: {json.dumps(obj.env)}")
