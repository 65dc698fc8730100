"""Output shared by the commands that queue work."""

from __future__ import annotations

import json
import sys
from typing import Any

import click


def echo_script(script: str) -> None:
    """Write ``script`` to stdout as exactly the bytes a submission writes to ``job.sh``.

    No markup interpretation, no ANSI stripping (``click.echo`` drops escape sequences when
    stdout is not a terminal), no newline added or removed, no wrapping: UTF-8, as
    :func:`aimass_hpc.common.fsutil.atomic_write_text` encodes it.
    """
    data = script.encode("utf-8")
    stream = sys.stdout
    binary = getattr(stream, "buffer", None)
    stream.flush()
    if binary is None:  # a text-only stream (an embedding caller's): the closest we can do
        stream.write(script)
        stream.flush()
        return
    binary.write(data)
    binary.flush()


def echo_dry_run(summary: dict[str, Any], script: str, as_json: bool) -> None:
    """What ``--dry-run`` prints: the rendered script byte for byte, or the summary plus the
    script as JSON."""
    if as_json:
        click.echo(json.dumps({**summary, "script": script}, indent=2))
    else:
        echo_script(script)


def echo_submit_note(note: str | None) -> None:
    """Say on stderr how a submission ended when it was not plain (an sbatch that timed out
    and whose job was found and adopted)."""
    if note:
        click.echo(f"aimass: note: {note}", err=True)
