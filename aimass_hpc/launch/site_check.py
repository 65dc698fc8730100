"""Checking a site config end to end: the work behind ``aimass site check``.

Everything in one pass: field errors (at their own key paths, with did-you-mean hints),
cross-field problems (checked on the rest of the config even when some fields are bad), and
the site's template overrides compiled (a syntax error names the file and line). A valid
config is then rendered through every job template with a typical request on every
partition, each script checked with ``bash -n`` (by
:func:`~aimass_hpc.launch.render.render_request`) and with shellcheck when it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from aimass_hpc.common.errors import AimassError
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import (
    Partition,
    Problem,
    Site,
    expand_path,
    load_site,
    resolve_site_path,
    validate_site_file,
)
from aimass_hpc.launch.render import TEMPLATE_NAMES, render_request, template_syntax_errors


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
    override = _override_dir(path)
    if override is not None:
        problems += override_syntax_problems(override)
    if not problems:
        problems = template_problems(load_site(str(path)))
    return SiteCheck(path, problems)


def _override_dir(path: Path) -> Path | None:
    """The site's template override directory, read from the raw file (so that it is checked
    even when other keys are invalid); None when there is none or it cannot be read."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    templates = data.get("templates")
    if isinstance(templates, str) and templates:
        try:
            folder = Path(expand_path(templates))
        except ValueError:
            return None
        folder = folder if folder.is_absolute() else path.parent / folder
    elif path.name == "site.toml":
        folder = path.parent
    else:
        return None
    return folder if folder.is_dir() else None


def override_syntax_problems(directory: Path) -> list[Problem]:
    """A problem per override template jinja cannot compile, naming its file and line."""
    return [
        Problem(
            f"templates.{Path(file).name}",
            f"{file} line {line}: {message}" if line else f"{file}: {message}",
            "fix the template",
        )
        for file, line, message in template_syntax_errors(directory)
    ]


def template_problems(site_obj: Site) -> list[Problem]:
    """Render every job template with a typical request and syntax-check it with ``bash -n``."""
    problems: list[Problem] = []
    for template in TEMPLATE_NAMES:
        for part in site_obj.partitions.values():
            problems += _render_problems(site_obj, template, part)
            if problems:
                break  # one partition's failure says enough about a template
    return problems


def _render_problems(site_obj: Site, template: str, part: Partition) -> list[Problem]:
    """Render ``template`` for a typical request on ``part``; its problems (none when fine)."""
    kind = template.removesuffix(".j2")
    request = JobRequest(
        kind=kind,
        name=f"site-check-{kind}",
        command=[site_obj.python, "-c", "print('it works')"],
        nodes=min(2, part.nodes or 1) if site_obj.scheduler == "slurm" else 1,
        gpus_per_node=part.gpus_per_node,
        partition=part.name,
        env={"AIMASS_CHECK": "a 'quoted' $(value)"},
    )
    where = f"templates.{template}"
    if len(site_obj.partitions) > 1:
        where += f" (partition {part.name})"
    try:
        # render_request also refuses a script that fails `bash -n`, naming the template.
        script = render_request(site_obj, request, Path(tempfile.gettempdir()) / "run")
    except AimassError as exc:
        return [Problem(where, str(exc), "fix the template or the site config")]
    return shellcheck_problems(script, where)


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
