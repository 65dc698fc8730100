"""Options several commands share: one declaration and one help text each.

Only click is imported here: every command module uses this, and ``aimass --help`` must stay
fast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

SITE_HELP = "Name or path of the site config (default: $AIMASS_SITE)."
SITE_METAVAR = "NAME|PATH"


def site_option(func: F | None = None, /, **settings: Any) -> Any:
    """``--site NAME|PATH`` (parameter ``site_ref``, ``None`` when not given).

    Use as ``@site_option``, or ``@site_option(expose_value=False, callback=...)`` where a
    command takes the site in a callback. The default stays ``None`` rather than click's
    ``envvar``: :func:`aimass_hpc.config.site.load_site` reads ``$AIMASS_SITE`` itself, and a
    command may know better than the environment (a search uses the site it was created on).
    """
    decorator = click.option(
        "--site", "site_ref", metavar=SITE_METAVAR, default=None, help=SITE_HELP, **settings
    )
    return decorator if func is None else decorator(func)


class Seconds(click.ParamType):
    """A duration in seconds: a finite number >= 0 (``-1``, ``nan`` and ``inf`` are refused,
    so a typo cannot mean "never" or "at once")."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not math.isfinite(seconds) or seconds < 0:
            shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}..."
            self.fail(f"{shown!r} is not a number of seconds >= 0", param, ctx)
        return seconds


SECONDS = Seconds()
