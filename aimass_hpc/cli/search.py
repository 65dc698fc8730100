"""``aimass search``: hyperparameter search with every trial a batch job.

Thin: parsing, printing and the choice of mode; the work is in
``aimass_hpc.launch.search_launch`` (and the driver in ``aimass_hpc.launch.search_driver``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import SECONDS, site_option
from aimass_hpc.cli._output import echo_script
from aimass_hpc.launch import journal as J

_SEARCH_HELP = """Hyperparameter search: each trial is a batch job.

\b
  aimass search SPEC.toml            run a search (same as `aimass search run SPEC.toml`)
  aimass search resume DIR           continue after the driver was killed
  aimass search status DIR           table of trials (params, value, state, job id, duration)
  aimass search cancel DIR           stop the search and its running trials
  aimass search plot DIR             best-so-far and parallel-coordinates PNGs
  aimass search list [GLOB]          searches under the site's runs root (name, state, best)

DIR is a search directory, or with --site the name of a search under that site's
<runs root>/searches (a directory there, or the newest search of that spec name).
Without --site, resume and cancel use the site the search was created on.

\b
Where the driver runs (the process that proposes trials and watches them):
  * in the foreground (default): on the login node, in your terminal. If your session or
    the login node dies, the trials already queued keep running; `aimass search resume DIR`
    picks the search up again with nothing lost and nothing run twice.
  * --detach: the driver runs as its own small CPU job (1 CPU; [driver] time, default the
    partition's MaxTime), its state in the search directory on the shared filesystem.
    Logging out does not stop it; watch it with `aimass search status DIR`. Warned of its
    time limit it requeues itself and carries on; if the job ends some other way,
    `aimass search resume DIR`.
  Only one driver runs a search at a time (driver.lock in DIR, with a heartbeat).

The search state is an append-only journal (journal.jsonl) in the search directory.
A search over a training spec puts the alias best-<search name> on its best model.
More: docs/search.md.
"""


class _SearchGroup(click.Group):
    """``aimass search SPEC.toml`` is ``aimass search run SPEC.toml``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_SearchGroup, help=_SEARCH_HELP)
def search() -> None:
    pass


def _echo_events(to_stderr: bool) -> Any:
    def echo(msg: str) -> None:
        click.echo(f"[{time.strftime('%H:%M:%S')}] {msg}", err=to_stderr)
        sys.stdout.flush()

    return echo


def _open(directory: str, site_ref: str | None = None) -> Any:
    """The search directory DIR (with --site, maybe a search's name under that site)."""
    from aimass_hpc.launch.search_launch import open_search

    return open_search(directory, site_ref)


def _read_state(sdir: Any) -> J.SearchState:
    """Replay the journal, saying on stderr what a crash left in it that was skipped.

    A damaged journal raises IntegrityError naming the file and line (exit 6).
    """
    from aimass_hpc.launch.search_launch import read_state

    state, notes = read_state(sdir)
    for note in notes[:3]:
        click.echo(f"aimass: warning: {note}", err=True)
    if len(notes) > 3:
        click.echo(f"aimass: warning: ... and {len(notes) - 3} more such lines", err=True)
    return state


@search.command("run")
@click.argument("spec_path", metavar="SPEC.toml", type=click.Path(dir_okay=False))
@site_option
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    help="The search directory (default: <runs root>/searches/<time>-<name>-<id>).",
)
@click.option("--dry-run", is_flag=True, help="Validate and print the first trial's job script.")
@click.option("--detach", is_flag=True, help="Run the driver as its own CPU job and return.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON on stdout.")
def run_cmd(
    spec_path: str,
    site_ref: str | None,
    directory: str | None,
    dry_run: bool,
    detach: bool,
    as_json: bool,
) -> None:
    """Run the search described by SPEC.toml (see `aimass search --help` for the modes)."""
    from aimass_hpc.launch import search_launch as L

    plan = L.plan_search(spec_path, site_ref, directory=directory, detach=detach)
    spec = plan.spec
    first_id, first_params = plan.first_trial
    if dry_run:
        if as_json:
            out = {
                "search_dir": str(plan.planned.path),
                "trial": {"id": first_id, "params": first_params, "script": plan.trial_script},
                "driver_script": plan.driver_script,
            }
            click.echo(json.dumps(out, indent=2))
            return
        click.echo(f"# search {spec.search.name!r}: {spec.search.budget} trials, "
                   f"{spec.search.parallel} at once, sampler {spec.search.sampler}")  # fmt: skip
        click.echo(f"# trial {first_id} params: {json.dumps(first_params)}")
        echo_script(plan.trial_script)
        if plan.driver_script is not None:
            click.echo("\n# --detach: the driver job")
            echo_script(plan.driver_script)
        return

    started = L.start_search(plan)
    sdir = started.sdir
    if started.driver is not None:  # --detach
        driver = started.driver
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "search_dir": str(sdir.path),
                        "driver_job_id": driver.job_id,
                        "driver_run_dir": str(driver.run_dir),
                    }
                )
            )
        else:
            click.echo(f"search {sdir.path}")
            click.echo(f"driver job {driver.job_id} (logs in {driver.run_dir / 'logs'})")
            click.echo(f"watch it: aimass search status {sdir.path}")
        return
    _drive(sdir, plan.site, as_json, first_line=f"search {sdir.path}")


def _drive(sdir: Any, site: Any, as_json: bool, first_line: str | None = None) -> None:
    from aimass_hpc.launch.search_launch import drive_search

    if first_line:
        click.echo(first_line, err=as_json)
    outcome = drive_search(sdir, site, echo=_echo_events(to_stderr=as_json))
    state, spec = outcome.state, outcome.spec
    if as_json:
        click.echo(json.dumps(_summary(sdir, state, spec), indent=2, default=str))
    else:
        _print_table(sdir, state, spec)
    if outcome.stopped_by is not None and not state.finished:
        click.echo(
            f"driver stopped by {outcome.stopped_by}; queued trials go on. "
            f"Continue with: aimass search resume {sdir.path}",
            err=True,
        )
        sys.exit(130)
    if state.finished and state.best_trial(spec.search.direction) is None:
        sys.exit(1)  # the search ran and every trial failed


@search.command("resume")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON on stdout.")
def resume_cmd(directory: str, site_ref: str | None, as_json: bool) -> None:
    """Continue a search whose driver stopped: no trial lost, none run twice.

    Trials that were queued or running are reconciled with the scheduler: finished ones are
    read, running ones adopted, lost ones resubmitted under the same trial id. Without
    --site, the search runs on the site it was created on.
    """
    from aimass_hpc.launch.search_launch import search_site

    sdir = _open(directory, site_ref)
    verb = "resuming" if _read_state(sdir).trials else "driving"
    _drive(sdir, search_site(site_ref, sdir), as_json, first_line=f"{verb} search {sdir.path}")


@search.command("status")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the trials as JSON.")
def status_cmd(directory: str, site_ref: str | None, as_json: bool) -> None:
    """Table of the trials: params, value, state, job id, duration.

    DIR is a search directory, or with --site a search's name under that site.
    """
    sdir = _open(directory, site_ref)
    state = _read_state(sdir)
    spec = sdir.spec(state)
    if as_json:
        click.echo(json.dumps(_summary(sdir, state, spec), indent=2, default=str))
    else:
        _print_table(sdir, state, spec)


@search.command("cancel")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@site_option
@click.option("--wait", "wait_s", type=SECONDS, default=60.0, show_default=True,
              help="Seconds to wait for a live driver to stop its trials.")  # fmt: skip
def cancel_cmd(directory: str, site_ref: str | None, wait_s: float) -> None:
    """Stop the search: cancel its queued and running trials (and its detached driver).

    Without --site, the jobs are cancelled on the site the search was created on.
    """
    from aimass_hpc.launch.search_launch import cancel_search

    sdir = _open(directory, site_ref)
    cancel_search(sdir, _read_state(sdir), site_ref, wait_s=wait_s, echo=_echo_events(False))
    click.echo(f"search {sdir.path} cancelled")


@search.command("plot")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Directory for the PNGs "
              "(default: the search directory).")  # fmt: skip
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the file paths as JSON.")
def plot_cmd(directory: str, out: str | None, site_ref: str | None, as_json: bool) -> None:
    """Draw best_so_far.png and parallel_coordinates.png for a search.

    DIR is a search directory, or with --site a search's name under that site.
    """
    from aimass_hpc.launch.search_plots import plot_search

    sdir = _open(directory, site_ref)
    state = _read_state(sdir)
    spec = sdir.spec(state)
    paths = plot_search(
        state, spec.search.direction, out or sdir.path, spec.search.name, spec.space_obj()
    )
    if as_json:
        click.echo(json.dumps([str(p) for p in paths]))
    else:
        for p in paths:
            click.echo(str(p))


@search.command("list")
@click.argument("pattern", metavar="[GLOB]", default="*")
@site_option
@click.option("--json", "as_json", is_flag=True, help="Print the searches as JSON.")
def list_cmd(pattern: str, site_ref: str | None, as_json: bool) -> None:
    """Searches under the site's <runs root>/searches whose name matches GLOB (default: all).

    Shows name, state (running, stopped, finished, cancelled), trials done/budget, the best
    value, the best model's alias (MODEL@best-NAME) and the search directory, oldest first.
    """
    from aimass_hpc.launch.search_launch import list_searches, search_site, searches_root

    site = search_site(site_ref)
    found = list_searches(site, pattern)
    if as_json:
        click.echo(json.dumps([s.to_dict() for s in found], indent=2))
        return
    root = searches_root(site)
    table = Table(
        title=f"searches matching {pattern!r}" if pattern != "*" else "searches",
        caption=f"search dirs are under {root} (--json: full paths)",
    )
    for col, kw in (
        ("name", {"no_wrap": True}),
        ("state", {"no_wrap": True}),
        ("trials", {"justify": "right", "no_wrap": True}),
        ("best", {"justify": "right", "no_wrap": True}),
        ("best ref", {"no_wrap": True}),
        ("search dir", {"overflow": "fold"}),
    ):
        table.add_column(col, **kw)
    for s in found:
        style = {"finished": "green", "running": "cyan", "damaged": "red"}.get(s.state, "")
        best = "" if s.best_value is None else f"{_fmt_value(s.best_value)} (trial {s.best_trial})"
        table.add_row(
            s.name,
            f"[{style}]{s.state}[/{style}]" if style else s.state,
            f"{s.done}/{s.budget if s.budget is not None else '?'}",
            best,
            s.best_ref or "",
            (s.path.name if s.path.parent == root else str(s.path))
            + (f"\n{s.note}" if s.note else ""),
        )
    Console().print(table)
    if not found:
        click.echo("no search found", err=True)


# ---------------------------------------------------------------------------------------------
# Output


def _summary(sdir: Any, state: J.SearchState, spec: Any) -> dict[str, Any]:
    from aimass_hpc.launch.search_launch import describe_search

    return {
        **describe_search(sdir, state, spec),
        "driver": _driver_text(sdir, state),
        "trials": [t.to_dict() for t in state.trials.values()],
    }


def _driver_text(sdir: Any, state: J.SearchState) -> str:
    from aimass_hpc.launch.search_launch import driver_holder

    if state.finished:
        return "finished"
    holder = driver_holder(sdir)
    if holder is None:
        return "not running (continue with `aimass search resume DIR`)"
    return f"pid {holder.pid} on {holder.host} (heartbeat {holder.heartbeat_age_s:.0f}s ago)"


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


_STATE_STYLE = {
    J.FINISHED: "green",
    J.FAILED: "red",
    J.PRUNED: "yellow",
    J.CANCELLED: "magenta",
    J.LOST: "red",
    J.RUNNING: "cyan",
    J.SUBMITTED: "blue",
}


def _print_table(sdir: Any, state: J.SearchState, spec: Any) -> None:
    console = Console()
    best = state.best_trial(spec.search.direction)
    now = time.time()
    table = Table(
        title=f"search {spec.search.name} ({spec.search.sampler}, {spec.search.direction} "
        f"{spec.search.metric})",
        caption=f"{sdir.path}\ndriver: {_driver_text(sdir, state)}",
    )
    for col, kw in (
        ("trial", {"justify": "right"}),
        ("state", {}),
        ("value", {"justify": "right"}),
        ("params", {"overflow": "fold"}),
        ("job id", {}),
        ("duration", {"justify": "right"}),
        ("note", {"overflow": "fold", "max_width": 40}),
    ):
        table.add_column(col, **kw)
    for t in state.trials.values():
        duration = t.duration
        if duration is None and t.state == J.RUNNING and t.started_at:
            duration = now - t.started_at
        note = t.reason or ""
        if t.attempts > 1:
            note = f"attempt {t.attempts}" + (f"; {note}" if note else "")
        marker = " *" if best is not None and t.id == best.id else ""
        style = _STATE_STYLE.get(t.state, "")
        table.add_row(
            f"{t.id}{marker}",
            f"[{style}]{t.state}[/{style}]" if style else t.state,
            "" if t.value is None else _fmt_value(t.value),
            " ".join(f"{k}={_fmt_value(v)}" for k, v in t.params.items()),
            t.job_id or "",
            _fmt_duration(duration),
            note,
        )
    console.print(table)
    counts: dict[str, int] = {}
    for t in state.trials.values():
        counts[t.state] = counts.get(t.state, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(
        f"{state.n_proposed}/{spec.search.budget} trials proposed ({summary or 'none'}); "
        f"at most {spec.search.parallel} at once"
    )
    if best is not None:
        console.print(
            f"best: trial {best.id} = {_fmt_value(best.value)}  {json.dumps(best.params)}"
        )
    if state.promoted:
        p = state.promoted
        model = p.get("model")
        names = p.get("aliases") or [p.get("alias") or "best"]
        aliases = " and ".join(f"{model}@{a}" for a in names)
        console.print(f"promoted: {model}:{p.get('version')} is {aliases}")
