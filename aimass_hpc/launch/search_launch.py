"""Starting, finding, driving and cancelling searches: the work behind ``aimass search``.

The search itself (sampler, trials, journal) is :mod:`aimass_hpc.launch.search_driver`; this
module is what a command does around it: check a search against the site before creating
anything, create it and submit its detached driver, find a search by name under a site's
runs root, and cancel a search together with its driver jobs.
"""

from __future__ import annotations

import contextlib
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.common.fsutil import os_error, shown_path
from aimass_hpc.config.search_spec import SearchSpec
from aimass_hpc.config.site import Site
from aimass_hpc.launch import journal as J
from aimass_hpc.launch import search_driver as D

Echo = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Finding a search


def open_search(directory: str, site_ref: str | None = None) -> D.SearchDir:
    """The search directory DIR; a path the OS cannot even look up is a one-line error.

    With ``site_ref``, a DIR that is not a search directory may name one under the site's
    ``<runs root>/searches`` (see :func:`find_search`).
    """
    try:
        try:
            return D.SearchDir.open(directory)
        except NotFoundError:
            if site_ref is None or not is_plain_name(directory):
                raise
            return D.SearchDir.open(find_search(directory, search_site(site_ref)))
    except OSError as exc:
        raise os_error(exc, f"search directory {shown_path(directory)}") from None
    except ValueError:  # a NUL in the path
        raise InputError(f"search directory {directory!r}: not a valid path") from None


def is_plain_name(text: str) -> bool:
    """A name, not a path: no separator, not ``.``/``..``, nothing a glob would read."""
    return bool(text) and text not in (".", "..") and not any(c in text for c in "/\\*?[]\0")


def find_search(name: str, site: Site) -> Path:
    """``<runs root>/searches/NAME``, else the newest ``<time>-NAME-<id>`` there."""
    root = site.runs_root / D.SEARCHES_DIR
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


@dataclass(frozen=True)
class SearchSummary:
    """One search as ``aimass search list`` shows it."""

    name: str
    state: str  # running | stopped | finished | cancelled | damaged
    done: int  # trials ended (finished, failed, pruned, cancelled)
    budget: int | None
    best_value: float | None
    best_trial: int | None
    best_ref: str | None  # MODEL@ALIAS of the promoted model, or None
    path: Path
    created_at: float | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``aimass search list --json``)."""
        return {
            "name": self.name,
            "state": self.state,
            "trials_done": self.done,
            "budget": self.budget,
            "best_value": self.best_value,
            "best_trial": self.best_trial,
            "best_ref": self.best_ref,
            "search_dir": str(self.path),
            "created_at": self.created_at,
            "note": self.note,
        }


def searches_root(site: Site) -> Path:
    """Where searches live by default: ``<runs root>/searches``."""
    return site.runs_root / D.SEARCHES_DIR


def list_searches(site: Site, pattern: str = "*") -> list[SearchSummary]:
    """Every search under ``<runs root>/searches`` whose name matches the glob ``pattern``,
    oldest first. A search whose journal cannot be read is listed as ``damaged``."""
    import fnmatch

    root = searches_root(site)
    try:
        entries = sorted(p for p in root.iterdir() if (p / J.JOURNAL_NAME).is_file())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise os_error(exc, f"searches directory {shown_path(root)}") from None
    out = []
    for entry in entries:
        summary = _summarize(D.SearchDir(entry))
        if fnmatch.fnmatchcase(summary.name, pattern):
            out.append(summary)
    out.sort(key=lambda s: (s.created_at or 0.0, str(s.path)))
    return out


def _summarize(sdir: D.SearchDir) -> SearchSummary:
    from aimass_hpc.common.errors import AimassError

    try:
        state = sdir.state()
        settings = journaled_settings(state)
    except (AimassError, OSError, ValueError) as exc:
        return SearchSummary(sdir.path.name, "damaged", 0, None, None, None, None, sdir.path,
                             None, note=str(exc)[:200])  # fmt: skip
    return summarize_state(sdir, state, settings)


def journaled_settings(state: J.SearchState) -> dict[str, Any]:
    """The ``search`` settings as journaled (not re-validated: a list must not load every
    search's training spec, nor fail when one was moved since); InputError without them."""
    settings = (state.spec or {}).get("search")
    if not isinstance(settings, dict) or not isinstance(settings.get("name"), str):
        raise InputError("the journal has no search_created record")
    return settings


def trial_counts(state: J.SearchState) -> dict[str, int]:
    """How many trials are in each state (``{"finished": 12, "running": 2}``)."""
    counts: dict[str, int] = {}
    for t in state.trials.values():
        counts[t.state] = counts.get(t.state, 0) + 1
    return counts


def describe_search(sdir: D.SearchDir, state: J.SearchState, spec: SearchSpec) -> dict[str, Any]:
    """One search's settings, trial counts, best trial and promoted model (the fields
    ``aimass search status --json`` and the dashboard's search page share)."""
    best = state.best_trial(spec.search.direction)
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
        "counts": trial_counts(state),
        "best": best.to_dict() if best else None,
        "promoted": state.promoted,
    }


def summarize_state(
    sdir: D.SearchDir, state: J.SearchState, settings: dict[str, Any]
) -> SearchSummary:
    """One search as ``aimass search list`` (and the dashboard) shows it, from its journal
    ``state`` already read and its :func:`journaled_settings`."""
    budget = settings.get("budget")
    best = state.best_trial(str(settings.get("direction", "minimize")))
    promoted = state.promoted or {}
    best_ref = None
    if promoted.get("model"):
        best_ref = f"{promoted['model']}@{promoted.get('alias') or D.BEST_ALIAS}"
    if state.finished:
        status = "cancelled" if state.cancel_requested else "finished"
    else:
        status = "running" if driver_alive(sdir) else "stopped"
    return SearchSummary(
        name=settings["name"],
        state=status,
        done=sum(t.terminal for t in state.trials.values()),
        budget=budget if isinstance(budget, int) else None,
        best_value=None if best is None else best.value,
        best_trial=None if best is None else best.id,
        best_ref=best_ref,
        path=sdir.path,
        created_at=state.created_at,
    )


def search_site(ref: str | None, sdir: D.SearchDir | None = None) -> Site:
    """The site ``ref``; without one, the site the search in ``sdir`` was created on."""
    from aimass_hpc.config.site import load_site

    if ref is None and sdir is not None:
        ref = sdir.site_ref()
    return load_site(ref)


def read_state(sdir: D.SearchDir) -> tuple[J.SearchState, list[str]]:
    """The journal replayed, and notes on what a crash left in it that was skipped.

    A damaged journal raises IntegrityError naming the file and line (exit 6).
    """
    journal = sdir.journal()
    state = journal.state()
    return state, journal.notes()


# ---------------------------------------------------------------------------------------------
# Starting a search


@dataclass(frozen=True)
class SearchPlan:
    """A search checked against its site, nothing created yet: the first trial's job script
    (and, with ``detach``, the driver's) as they would be submitted."""

    spec: SearchSpec
    site: Site
    spec_path: str
    directory: str | None
    planned: D.SearchDir  # its path has placeholders when no directory was given
    first_trial: tuple[int, dict[str, Any]]  # id, params
    trial_script: str
    driver_script: str | None


@dataclass(frozen=True)
class DriverJob:
    """A detached driver's batch job."""

    job_id: str | None
    run_dir: Path


@dataclass(frozen=True)
class StartedSearch:
    """A created search; with --detach, its driver job too."""

    sdir: D.SearchDir
    driver: DriverJob | None = None


def resolve_dir(directory: str) -> Path:
    """``--dir`` as an absolute path; one line when the OS cannot take it."""
    try:
        return Path(directory).expanduser().resolve()
    except OSError as exc:
        raise os_error(exc, f"--dir {shown_path(directory)}") from None
    except ValueError:
        raise InputError(f"--dir {directory!r}: not a valid path") from None


def plan_search(
    spec_path: str, site_ref: str | None, *, directory: str | None = None, detach: bool = False
) -> SearchPlan:
    """Load SPEC.toml and the site and check a first trial (and the driver job) against the
    site: every error a submission would meet, before anything is created."""
    from aimass_hpc.config.search_spec import load_search_spec
    from aimass_hpc.launch.submit import submit

    spec = load_search_spec(spec_path)
    site = search_site(site_ref)
    planned = D.SearchDir(
        resolve_dir(directory)
        if directory
        else site.runs_root / D.SEARCHES_DIR / f"<time>-{spec.search.name}-<id>"
    )
    sampler = D.make_sampler(spec, spec.search.seed or 0)
    (first,) = sampler.ask(1)
    trial_req, _files = D.build_trial(spec, site, planned, first.id, first.params)
    preview = submit(site, trial_req, dry_run=True, runs_root=planned.trials_root)
    driver_script = None
    if detach:
        driver_script = submit(
            site, D.driver_request(spec, site, planned), dry_run=True, runs_root=planned.driver_root
        ).script
    return SearchPlan(
        spec=spec,
        site=site,
        spec_path=spec_path,
        directory=directory,
        planned=planned,
        first_trial=(first.id, first.params),
        trial_script=preview.script,
        driver_script=driver_script,
    )


def start_search(plan: SearchPlan) -> StartedSearch:
    """Create the planned search (journal ``search_created``, a copy of SPEC.toml); with
    --detach (``plan.driver_script``), submit the driver job and journal it."""
    from aimass_hpc.launch.submit import submit

    spec, site = plan.spec, plan.site
    text = Path(plan.spec_path).read_text(encoding="utf-8")
    try:
        sdir = D.create_search(spec, site, directory=plan.directory, spec_text=text)
    except OSError as exc:
        where = exc.filename if exc.filename is not None else plan.planned.path.parent
        raise os_error(exc, f"cannot create the search directory {shown_path(where)}") from None
    if plan.driver_script is None:
        return StartedSearch(sdir)
    sub = submit(
        site,
        D.driver_request(spec, site, sdir),
        spec={"search_dir": str(sdir.path), "role": "search driver"},
        runs_root=sdir.driver_root,
    )
    sdir.journal().append(J.DRIVER_SUBMITTED, job_id=str(sub.job_id), run_dir=str(sub.run_dir.path))
    return StartedSearch(sdir, DriverJob(sub.job_id, sub.run_dir.path))


@dataclass(frozen=True)
class DriveOutcome:
    """How a driver run in this process ended."""

    state: J.SearchState
    spec: SearchSpec
    stopped_by: str | None  # the signal that stopped the driver early, if any


def drive_search(sdir: D.SearchDir, site: Site, echo: Echo | None = None) -> DriveOutcome:
    """Run (or resume) the search's driver here until the search ends or a signal stops it."""
    driver = D.SearchDriver(sdir, site, echo=echo)
    state = driver.run()
    return DriveOutcome(state, driver.spec, driver.stopped_by)


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass(frozen=True)
class DriverHolder:
    """The live driver of a search: where it runs and how fresh its heartbeat is."""

    pid: int
    host: str
    heartbeat_age_s: float


def driver_alive(sdir: D.SearchDir) -> bool:
    """Whether a driver holds the search: a live pid here, or a fresh heartbeat elsewhere."""
    return J.live_lock_holder(sdir.lock_path, D.DRIVER_STALE_S) is not None


def driver_holder(sdir: D.SearchDir) -> DriverHolder | None:
    """The driver holding the search now (None when none is alive)."""
    holder = J.read_lock_holder(sdir.lock_path)
    if holder is None or not driver_alive(sdir):
        return None
    try:
        beat = time.time() - sdir.lock_path.stat().st_mtime
    except FileNotFoundError:  # released since
        beat = 0.0
    return DriverHolder(holder.pid, holder.host, beat)


# ---------------------------------------------------------------------------------------------
# Cancelling


def request_cancel(sdir: D.SearchDir, state: J.SearchState) -> None:
    """Journal the cancel request (once): a live driver sees it at its next poll.

    ConflictError when the search has already finished.
    """
    if state.finished:
        raise ConflictError(f"search {sdir.path} has already finished")
    if not state.cancel_requested:
        sdir.journal().append(J.CANCEL_REQUESTED, host=socket.gethostname())


def cancel_search(
    sdir: D.SearchDir,
    state: J.SearchState,
    site_ref: str | None = None,
    *,
    wait_s: float = 60.0,
    echo: Echo | None = None,
) -> None:
    """Stop the search: request the cancel, let a live driver (for up to ``wait_s``) or else a
    driver run here cancel the queued and running trials, then cancel the driver's own jobs.

    Without ``site_ref``, the jobs are cancelled on the site the search was created on.
    """
    request_cancel(sdir, state)
    site = search_site(site_ref, sdir)
    if driver_alive(sdir):
        # A live driver sees the request at its next poll, cancels the trials and finishes.
        deadline = time.monotonic() + wait_s
        journal = sdir.journal()  # one journal: each check reads only what was appended
        while time.monotonic() < deadline and not journal.state().finished:
            time.sleep(0.5)
    if not sdir.state().finished:
        try:
            D.SearchDriver(sdir, site, echo=echo).run()
        except ConflictError as exc:
            raise ConflictError(
                f"cancel requested, but the driver has not stopped yet: {exc}"
            ) from None
    cancel_driver_jobs(sdir, site)


def cancel_driver_jobs(sdir: D.SearchDir, site: Site) -> None:
    """Cancel the search's detached driver jobs that are still queued or running."""
    from aimass_hpc.launch.scheduler import get_scheduler

    ids = [str(d["job_id"]) for d in sdir.state().driver_jobs if d.get("job_id")]
    if not ids:
        return
    scheduler = get_scheduler(site)
    live = [i for i, st in scheduler.status(ids).items() if not st.is_terminal]
    if live:
        with contextlib.suppress(NotFoundError):
            scheduler.cancel(live)
