"""``aimass site``: check, list and show site configs (for site admins)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.common.errors import AimassError, InputError
from aimass_hpc.config.site import (
    Problem,
    Site,
    list_sites,
    load_site,
    resolve_site_path,
    validate_site_file,
)


@click.group()
def site() -> None:
    """Site configs: what a cluster offers and how jobs run there."""


def template_problems(site_obj: Site) -> list[Problem]:
    """Render every job template with a typical request and syntax-check it with ``bash -n``."""
    from aimass_hpc.config.job_spec import JobRequest
    from aimass_hpc.launch.render import TEMPLATE_NAMES, render_request

    part = site_obj.default_partition
    problems: list[Problem] = []
    for template in TEMPLATE_NAMES:
        kind = template.removesuffix(".j2")
        request = JobRequest(
            kind=kind,  # type: ignore[arg-type]
            name=f"site-check-{kind}",
            command=[site_obj.python, "-c", "print('it works')"],
            nodes=min(2, part.nodes or 1) if site_obj.scheduler == "slurm" else 1,
            gpus_per_node=part.gpus_per_node,
            env={"AIMASS_CHECK": "a 'quoted' $(value)"},
        )
        where = f"templates.{template}"
        try:
            # render_request also refuses a script that fails `bash -n`, naming the template.
            script = render_request(site_obj, request, Path(tempfile.gettempdir()) / "run")
        except AimassError as exc:
            problems.append(Problem(where, str(exc), "fix the template or the site config"))
            continue
        problems += _shellcheck_problems(script, where)
    return problems


def _shellcheck_problems(script: str, where: str) -> list[Problem]:
    """shellcheck's warnings about a rendered script (none when shellcheck is not installed)."""
    if not shutil.which("shellcheck"):
        return []
    lint = subprocess.run(
        ["shellcheck", "-S", "warning", "-s", "bash", "-f", "gcc", "-"],
        input=script,
        capture_output=True,
        text=True,
    )
    return [
        Problem(
            where,
            f"shellcheck: {line.split(': ', 1)[-1]}",
            "fix the template (or the config value)",
        )
        for line in lint.stdout.splitlines()[:5]
    ]


def _one_ref(ref: str | None, site_ref: str | None) -> str | None:
    """The site named by the REF argument or by --site (they may not disagree)."""
    if ref is not None and site_ref is not None and ref != site_ref:
        raise InputError(f"two sites given: {ref!r} and --site {site_ref!r}; give one")
    return ref if ref is not None else site_ref


@site.command("check")
@click.argument("ref", required=False, metavar="[NAME|PATH]")
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the problems as JSON.")
def check(ref: str | None, site_ref: str | None, as_json: bool) -> None:
    """Validate a site config FILE or NAME: every problem, with its key path and a hint.

    The site is the argument, or --site, or $AIMASS_SITE.

    Names and values are checked first (a bad value is reported at its own key, e.g.
    `partitions.gpu.gpu_type`); a valid config is then rendered through every job template and
    checked with `bash -n` (and shellcheck, when installed).
    Exits non-zero when anything is wrong.
    """
    path = resolve_site_path(_one_ref(ref, site_ref))
    problems = validate_site_file(path)
    if not problems:
        problems = template_problems(load_site(str(path)))
    if as_json:
        click.echo(json.dumps([p.__dict__ for p in problems], indent=2))
    else:
        for problem in problems:
            click.echo(f"{path}: {problem}")
    if problems:
        raise InputError(f"{len(problems)} problem(s) in site config {path}")
    if not as_json:
        click.echo(f"{path}: ok (config valid; job, train, trial and serve templates render)")


@site.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def list_cmd(as_json: bool) -> None:
    """Sites visible by name (~/.config/aimass/sites, /etc/aimass/sites, bundled)."""
    rows = []
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
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    console.print(f"[bold]{obj.name}[/bold]: {obj.description}  ({obj.source})")
    console.print(f"scheduler {obj.scheduler}, account {obj.account or '-'}, qos {obj.qos or '-'}")
    table = Table("partition", "default", "nodes", "GPUs/node", "gres", "CPUs", "mem", "max time")
    for part in obj.partitions.values():
        gres = part.gpu_gres(part.gpus_per_node) if part.gpus_per_node else "-"
        table.add_row(
            part.name,
            "*" if part is obj.default_partition else "",
            str(part.nodes or "?"),
            str(part.gpus_per_node),
            gres,
            str(part.cpus_per_node),
            part.mem_per_node or "-",
            part.max_time,
        )
    console.print(table)
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
