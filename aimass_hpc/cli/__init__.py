"""The ``aimass`` command line: a lazy click group, one module per noun.

Subcommands are imported only when used so that ``aimass status`` does not pay for torch or
h5py. A module that is not present (an optional part not installed) is simply not listed.

What reaches the user is one line, never a traceback: an ``AimassError`` prints as
``aimass: error: MESSAGE`` and exits with its code. An ``OSError`` that no module turned into
an ``AimassError`` (a path the OS refused, a full disk) is the last resort: one line naming the
file and the OS reason, exit 2 for an unusable path or 5 for a system failure (see
:func:`aimass_hpc.common.fsutil.os_error`). Set ``AIMASS_DEBUG=1`` to see its traceback instead (the
tests do, so that a module that lets an OSError through is found and fixed).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys

import click

from aimass_hpc import __version__
from aimass_hpc.common.errors import AimassError

# command name -> (module, attribute). Keep sorted by noun; each module owns its commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "site": ("aimass_hpc.cli.site", "site"),
    "render": ("aimass_hpc.cli.jobs", "render"),
    "submit": ("aimass_hpc.cli.jobs", "submit"),
    "status": ("aimass_hpc.cli.jobs", "status"),
    "wait": ("aimass_hpc.cli.jobs", "wait"),
    "logs": ("aimass_hpc.cli.jobs", "logs"),
    "cancel": ("aimass_hpc.cli.jobs", "cancel"),
    "models": ("aimass_hpc.cli.models", "models"),
    "train": ("aimass_hpc.cli.train", "train"),
    "plot": ("aimass_hpc.cli.train", "plot"),
    "search": ("aimass_hpc.cli.search", "search"),
    "serve": ("aimass_hpc.cli.serve", "serve"),
    "endpoints": ("aimass_hpc.cli.serve", "endpoints"),
    "bench": ("aimass_hpc.cli.serve", "bench"),
    "reserve": ("aimass_hpc.cli.reserve", "reserve"),
    "dashboard": ("aimass_hpc.cli.dashboard", "dashboard"),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for n, (mod, _) in COMMANDS.items() if _module_exists(mod))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = COMMANDS.get(cmd_name)
        if entry is None or not _module_exists(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        return getattr(module, entry[1])


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="aimass")
def cli() -> None:
    """aimass: AI training, search and serving on Slurm clusters.

    Exit codes: 0 ok, 1 the work failed, 2 bad input, 3 not found, 4 conflict,
    5 scheduler/system failure, 6 integrity failure.
    """


DEBUG_ENV = "AIMASS_DEBUG"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and an exit code."""
    try:
        cli.main(args=argv, prog_name="aimass", standalone_mode=False)
    except AimassError as exc:
        click.echo(f"aimass: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        # `aimass status | head`: the reader left; say nothing more (and do not let Python
        # complain about flushing stdout at exit).
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        from aimass_hpc.common.fsutil import os_error, shown_path

        where = shown_path(exc.filename) if exc.filename is not None else "system error"
        error = os_error(exc, where)
        click.echo(f"aimass: error: {error}", err=True)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aimass: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("aimass: interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
