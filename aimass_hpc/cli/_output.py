"""Output shared by the commands that queue work."""

from __future__ import annotations

import json
from typing import Any

import click


def echo_dry_run(summary: dict[str, Any], script: str, as_json: bool) -> None:
    """What ``--dry-run`` prints: the rendered script, or the summary plus script as JSON."""
    if as_json:
        click.echo(json.dumps({**summary, "script": script}, indent=2))
    else:
        click.echo(script, nl=False)
