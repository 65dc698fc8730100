"""``aimass search``: hyperparameter search with every trial a batch job.

Thin: parsing, printing and the choice of mode; the work is in ``aimass_hpc.launch.search_driver``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.cli._output import echo_script
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.common.fsutil import os_error, shown_path
from aimass_hpc.launch import journal as J

_SEARCH_HELP = """Hyperparameter search: each trial is a batch job.

\b
  aimass search SPEC.toml            run a search (same as `aimass search run SPEC.toml`)
  aimass search resume DIR           continue after the driver was killed
  aimass search status DIR           table of trials (params, value, state, job id, duration)
  aimass search cancel DIR           stop the search and its running trials
  aimass search plot DIR             best-so-far and parallel-coordinates PNGs

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
    """The search directory DIR; a path the OS cannot even look up is a one-line error.

    With --site, a DIR that is not a search directory may name one under the site's
    ``<runs root>/searches``: a directory there, or the newest search of that spec name.
    """
    from aimass_hpc.launch.search_driver import SearchDir

    try:
        try:
            return SearchDir.open(directory)
        except NotFoundError:
            if site_ref is None or not _is_plain_name(directory):
                raise
            return SearchDir.open(_search_under_site(directory, site_ref))
    except OSError as exc:
        raise os_error(exc, f"search directory {shown_path(directory)}") from None
    except ValueError:  # a NUL in the path
        raise InputError(f"search directory {directory!r}: not a valid path") from None


def _is_plain_name(text: str) -> bool:
    """A name, not a path: no separator, not ``.``/``..``, nothing a glob would read."""
    return bool(text) and text not in (".", "..") and not any(c in text for c in "/\\*?[]\0")


def _search_under_site(name: str, site_ref: str) -> Path:
    """``<runs root>/searches/NAME``, else the newest ``<time>-NAME-<id>`` there."""
    import re

    from aimass_hpc.launch.search_driver import SEARCHES_DIR

    root = _site(site_ref).runs_root / SEARCHES_DIR
    exact = root / name
    if exact.is_dir():
        return exact
    # create_search names directories <YYYYmmdd-HHMMSS>-<spec name>-<hex id>: sorting by name
    # is sorting by time.
    pattern = re.compile(rf"[0-9]{{8}}-[0-9]{{6}}-{re.escape(name)}-[0-9a-f]+")
    found = sorted(p for p in root.glob(f"*-{name}-*") if pattern.fullmatch(p.name))
    if not found:
        raise NotFoundError(f"no search {name!r} under {shown_path(root)}")
    return found[-1]


def _read_state(sdir: Any) -> J.SearchState:
    """Replay the journal, saying on stderr what a crash left in it that was skipped.

    A damaged journal raises IntegrityError naming the file and line (exit 6).
    """
    journal = sdir.journal()
    state = J.replay(journal.records())
    notes = journal.notes()
    for note in notes[:3]:
        click.echo(f"aimass: warning: {note}", err=True)
    if len(notes) > 3:
        click.echo(f"aimass: warning: ... and {len(notes) - 3} more such lines", err=True)
    return state


def _resolve_dir(directory: str) -> Path:
    """``--dir`` as an absolute path; one line when the OS cannot take it."""
    try:
        return Path(directory).expanduser().resolve()
    except OSError as exc:
        raise os_error(exc, f"--dir {shown_path(directory)}") from None
    except ValueError:
        raise InputError(f"--dir {directory!r}: not a valid path") from None


def _site(ref: str | None, sdir: Any = None) -> Any:
    from aimass_hpc.config.site import load_site

    if ref is None and sdir is not None:
        ref = sdir.site_ref()
    return load_site(ref)


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
    from aimass_hpc.config.search_spec import load_search_spec
    from aimass_hpc.launch import search_driver as D
    from aimass_hpc.launch.submit import submit

    spec = load_search_spec(spec_path)
    site = _site(site_ref)
    planned = D.SearchDir(
        _resolve_dir(directory)
        if directory
        else site.runs_root / D.SEARCHES_DIR / f"<time>-{spec.search.name}-<id>"
    )
    # Check a trial (and the driver job) against the site before creating anything.
    sampler = D.make_sampler(spec, spec.search.seed or 0)
    (first,) = sampler.ask(1)
    trial_req, _files = D.build_trial(spec, site, planned, first.id, first.params)
    preview = submit(site, trial_req, dry_run=True, runs_root=planned.trials_root)
    driver_preview = None
    if detach:
        driver_preview = submit(
            site, D.driver_request(spec, site, planned), dry_run=True, runs_root=planned.driver_root
        )
    if dry_run:
        if as_json:
            out = {
                "search_dir": str(planned.path),
                "trial": {"id": first.id, "params": first.params, "script": preview.script},
                "driver_script": driver_preview.script if driver_preview else None,
            }
            click.echo(json.dumps(out, indent=2))
            return
        click.echo(f"# search {spec.search.name!r}: {spec.search.budget} trials, "
                   f"{spec.search.parallel} at once, sampler {spec.search.sampler}")  # fmt: skip
        click.echo(f"# trial {first.id} params: {json.dumps(first.params)}")
        echo_script(preview.script)
        if driver_preview is not None:
            click.echo("\n# --detach: the driver job")
            echo_script(driver_preview.script)
        return

    text = Path(spec_path).read_text(encoding="utf-8")
    try:
        sdir = D.create_search(spec, site, directory=directory, spec_text=text)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else planned.path.parent
        raise os_error(exc, f"cannot create the search directory {shown_path(where)}") from None
    if detach:
        sub = submit(
            site,
            D.driver_request(spec, site, sdir),
            spec={"search_dir": str(sdir.path), "role": "search driver"},
            runs_root=sdir.driver_root,
        )
        sdir.journal().append(
            J.DRIVER_SUBMITTED, job_id=str(sub.job_id), run_dir=str(sub.run_dir.path)
        )
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "search_dir": str(sdir.path),
                        "driver_job_id": sub.job_id,
                        "driver_run_dir": str(sub.run_dir.path),
                    }
                )
            )
        else:
            click.echo(f"search {sdir.path}")
            click.echo(f"driver job {sub.job_id} (logs in {sub.run_dir.path / 'logs'})")
            click.echo(f"watch it: aimass search status {sdir.path}")
        return
    _drive(sdir, site, as_json, first_line=f"search {sdir.path}")


def _drive(sdir: Any, site: Any, as_json: bool, first_line: str | None = None) -> None:
    from aimass_hpc.launch.search_driver import SearchDriver

    echo = _echo_events(to_stderr=as_json)
    if first_line:
        click.echo(first_line, err=as_json)
    driver = SearchDriver(sdir, site, echo=echo)
    state = driver.run()
    spec = driver.spec
    if as_json:
        click.echo(json.dumps(_summary(sdir, state, spec), indent=2, default=str))
    else:
        _print_table(sdir, state, spec)
    if driver.stopped_by is not None and not state.finished:
        click.echo(
            f"driver stopped by {driver.stopped_by}; queued trials go on. "
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
    sdir = _open(directory, site_ref)
    verb = "resuming" if _read_state(sdir).trials else "driving"
    _drive(sdir, _site(site_ref, sdir), as_json, first_line=f"{verb} search {sdir.path}")


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
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True,
              help="Seconds to wait for a live driver to stop its trials.")  # fmt: skip
def cancel_cmd(directory: str, site_ref: str | None, wait_s: float) -> None:
    """Stop the search: cancel its queued and running trials (and its detached driver).

    Without --site, the jobs are cancelled on the site the search was created on.
    """
    from aimass_hpc.launch.search_driver import SearchDriver

    sdir = _open(directory, site_ref)
    state = _read_state(sdir)
    if state.finished:
        raise ConflictError(f"search {sdir.path} has already finished")
    if not state.cancel_requested:
        sdir.journal().append(J.CANCEL_REQUESTED, host=socket.gethostname())
    site = _site(site_ref, sdir)
    if _driver_alive(sdir):
        # A live driver sees the request at its next poll, cancels the trials and finishes.
        deadline = time.monotonic() + wait_s
        journal = sdir.journal()  # one journal: each check reads only what was appended
        while time.monotonic() < deadline and not journal.state().finished:
            time.sleep(0.5)
    if not sdir.state().finished:
        try:
            SearchDriver(sdir, site, echo=_echo_events(False)).run()
        except ConflictError as exc:
            raise ConflictError(
                f"cancel requested, but the driver has not stopped yet: {exc}"
            ) from None
    _cancel_driver_jobs(sdir, site)
    click.echo(f"search {sdir.path} cancelled")


def _cancel_driver_jobs(sdir: Any, site: Any) -> None:
    from aimass_hpc.launch.scheduler import get_scheduler

    ids = [str(d["job_id"]) for d in sdir.state().driver_jobs if d.get("job_id")]
    if not ids:
        return
    scheduler = get_scheduler(site)
    live = [i for i, st in scheduler.status(ids).items() if not st.is_terminal]
    if live:
        with contextlib.suppress(NotFoundError):
            scheduler.cancel(live)


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


# ---------------------------------------------------------------------------------------------
# Output


def _summary(sdir: Any, state: J.SearchState, spec: Any) -> dict[str, Any]:
    best = state.best_trial(spec.search.direction)
    counts: dict[str, int] = {}
    for t in state.trials.values():
        counts[t.state] = counts.get(t.state, 0) + 1
    return {
        "search_dir": str(sdir.path),
        "name": spec.search.name,
        "sampler": spec.search.sampler,
        "direction": spec.search.direction,
        "metric": spec.search.metric,
        "budget": spec.search.budget,
        "parallel": spec.search.parallel,
        "seed": spec.search.seed,
        "finished": state.finished,
        "cancelled": state.cancel_requested,
        "counts": counts,
        "best": best.to_dict() if best else None,
        "promoted": state.promoted,
        "driver": _driver_text(sdir, state),
        "trials": [t.to_dict() for t in state.trials.values()],
    }


def _driver_alive(sdir: Any) -> bool:
    """Whether a driver holds the search: a live pid here, or a fresh heartbeat elsewhere."""
    from aimass_hpc.launch.search_driver import DRIVER_STALE_S

    return J.live_lock_holder(sdir.lock_path, DRIVER_STALE_S) is not None


def _driver_text(sdir: Any, state: J.SearchState) -> str:
    if state.finished:
        return "finished"
    holder = J.read_lock_holder(sdir.lock_path)
    if holder is None or not _driver_alive(sdir):
        return "not running (continue with `aimass search resume DIR`)"
    beat = time.time() - sdir.lock_path.stat().st_mtime if sdir.lock_path.exists() else 0
    return f"pid {holder.pid} on {holder.host} (heartbeat {beat:.0f}s ago)"


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
        console.print(f"promoted: {p.get('model')}:{p.get('version')} is {p.get('model')}@best")
