"""Checking a site config end to end: the work behind ``aimass site check``.

Names and values first (a bad value is reported at its own key path); a valid config is then
rendered through every job template with a typical request, each script checked with
``bash -n`` (by :func:`~aimass_hpc.launch.render.render_request`) and with shellcheck when it
is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from aimass_hpc.common.errors import AimassError
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import Problem, Site, load_site, resolve_site_path, validate_site_file
from aimass_hpc.launch.render import TEMPLATE_NAMES, render_request


@dataclass(frozen=True)
class SiteCheck:
    """The outcome of :func:`check_site`: the file checked and what is wrong with it."""

    path: Path
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_site(ref: str | None) -> SiteCheck:
    """Validate the site ``ref`` (name or path; None: ``$AIMASS_SITE``) and, when valid,
    render every job template for it. Raises only when no site file can be found."""
    path = resolve_site_path(ref)
    problems = validate_site_file(path)
    if not problems:
        problems = template_problems(load_site(str(path)))
    return SiteCheck(path, problems)


def template_problems(site_obj: Site) -> list[Problem]:
    """Render every job template with a typical request and syntax-check it with ``bash -n``."""
    part = site_obj.default_partition
    problems: list[Problem] = []
    for template in TEMPLATE_NAMES:
        kind = template.removesuffix(".j2")
        request = JobRequest(
            kind=kind,
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
        problems += shellcheck_problems(script, where)
    return problems


def shellcheck_problems(script: str, where: str) -> list[Problem]:
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
