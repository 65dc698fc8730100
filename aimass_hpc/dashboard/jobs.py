"""The jobs the dashboard shows: run directories joined with the scheduler's word on them.

Server-side paging and filtering: every call lists the run directories (names and
``state.json`` only), keeps those the viewer may see, filters by name and state, and asks the
scheduler about at most one page of jobs (all of the filtered ones only when filtering by
state). A job that has ended is asked about once: its status and owner are kept in memory.

Parsed ``state.json`` files, specs and metrics summaries are kept between calls while the
file stays the same (:class:`~aimass_hpc.dashboard.filecache.FileCache`), so a poll of
thousands of runs costs a directory listing and a stat per run.

Who owns a job is Slurm's word (``squeue``/``sacct`` user); where the scheduler does not know
the job (a local backend, a job accounting has forgotten) it is the run directory's owner.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aimass_hpc.common.errors import AimassError, InputError, NotFoundError
from aimass_hpc.common.slurm_cli import run_command, submission_env
from aimass_hpc.common.slurm_states import JobState
from aimass_hpc.config.site import Site
from aimass_hpc.dashboard.filecache import FileCache
from aimass_hpc.dashboard.paging import page_of, path_owner
from aimass_hpc.launch.failure_report import rank_lines, settled_outcome
from aimass_hpc.launch.runs import RunDir, list_runs
from aimass_hpc.launch.scheduler import JobStatus, get_scheduler
from aimass_hpc.runtime.metrics import METRICS_FILE, read_metrics, summarize

# The most log text one call returns (the page asks again from the offset it got).
LOG_CHUNK = 256 * 1024
STATES = tuple(state.value for state in JobState)


def current_user() -> str:
    """The login name of this process's user."""
    return pwd.getpwuid(os.getuid()).pw_name


def visible(owner: str | None, viewer: str, admins: Iterable[str]) -> bool:
    """Whether ``viewer`` may see (and act on) a job owned by ``owner``.

    Admins see every job; anyone else sees only their own. A job whose owner nobody can tell
    is shown to admins only.
    """
    return viewer in set(admins) or (owner is not None and owner == viewer)


@dataclass
class Row:
    """One job as the Jobs page lists it."""

    job_id: str
    run: RunDir
    name: str
    recorded: dict[str, Any] | None  # state.json's outcome, once a status call saw it end


class JobsView:
    """The jobs of one site's runs root, as one viewer may see them."""

    def __init__(self, site: Site, viewer: str, admins: Iterable[str] = ()) -> None:
        self.site = site
        self.viewer = viewer
        self.admins = frozenset(admins)
        self.scheduler = get_scheduler(site)
        self._owners: dict[str, str | None] = {}
        self._final: dict[str, dict[str, Any]] = {}  # ended jobs (they do not change)
        self._lock = threading.Lock()
        self._states: FileCache[dict[str, Any]] = FileCache()
        self._specs: FileCache[Any] = FileCache()
        self._summaries: FileCache[dict[str, Any] | None] = FileCache()

    # ------------------------------------------------------------------ listing

    def rows(self) -> list[Row]:
        """Every submitted run under the runs root, newest submission first (no scheduler
        call; the directory names only order runs to the second)."""
        out: list[tuple[float, Row]] = []
        runs = _all_runs(self.site.runs_root)
        for run in runs:
            try:
                state = self._states.get(run.state_path, run.read_state)
            except FileNotFoundError:
                continue  # removed since it was listed
            except AimassError:
                continue  # a damaged state.json: `aimass status` names it
            job_id = state.get("job_id")
            if not isinstance(job_id, str) or not job_id:
                continue
            outcome = state.get("outcome")
            recorded = outcome if isinstance(outcome, dict) else None
            when = state.get("submitted_at") or state.get("created_at") or 0
            row = Row(job_id, run, str(state.get("name") or run.path.name), recorded)
            out.append((when if isinstance(when, int | float) else 0, row))
        out.sort(key=lambda item: item[0], reverse=True)  # stable: names break ties
        alive = {run.path for run in runs}
        for cache in (self._states, self._specs, self._summaries):
            cache.keep(alive)  # forget removed runs
        return [row for _, row in out]

    def summary(self, run: RunDir) -> dict[str, Any] | None:
        """:func:`~aimass_hpc.runtime.metrics.summarize` of the run's metrics, kept while
        ``metrics.jsonl`` stays the same (FileNotFoundError without one)."""
        path = run.path / METRICS_FILE
        return self._summaries.get(path, lambda: summarize(run.path))

    def _progress(self, run: RunDir) -> dict[str, Any] | None:
        """Training progress (step, total steps, loss) from the run's metrics, if it logs any."""
        try:
            summary = self.summary(run)
        except (OSError, ValueError):
            return None
        if not summary or not summary.get("step"):
            return None
        return {k: summary.get(k) for k in ("step", "total_steps", "loss")}

    def _gpus(self, run: RunDir) -> Any:
        """Nodes x GPUs the spec asked for (the spec does not change: kept)."""
        try:
            return self._specs.get(run.spec_path, lambda: _gpus(run))
        except OSError:
            return None

    def owners(self, rows: list[Row]) -> dict[str, str | None]:
        """Owner of each row's job: Slurm's user, else the run directory's owner (cached)."""
        with self._lock:
            missing = [r for r in rows if r.job_id not in self._owners]
        if missing:
            found = self._slurm_users([r.job_id for r in missing])
            for row in missing:
                owner = found.get(row.job_id.split("_", 1)[0]) or path_owner(row.run.path)
                with self._lock:
                    self._owners[row.job_id] = owner
        with self._lock:
            return {r.job_id: self._owners.get(r.job_id) for r in rows}

    def _slurm_users(self, ids: list[str]) -> dict[str, str]:
        """``{job id: user}`` from one squeue call (all users) and one sacct call for the rest."""
        if self.site.scheduler != "slurm":
            return {}
        out: dict[str, str] = {}
        proc = run_command(
            ["squeue", "--states=all", "--noheader", "--array", "-o", "%i|%u"],
            env=submission_env(),
        )
        if proc.returncode == 0:
            for line in proc.stdout.splitlines():
                job, _, user = line.strip().partition("|")
                if user:
                    out[job.split("_", 1)[0]] = user
        rest = sorted({i.split("_", 1)[0] for i in ids} - set(out))
        if rest:
            proc = run_command(
                ["sacct", "-X", "--noheader", "--parsable2", "--allusers",
                 f"--jobs={','.join(rest)}", "--format=JobID,User"],
                env=submission_env(),
            )  # fmt: skip
            if proc.returncode == 0:  # accounting down: the run directory's owner it is
                for line in proc.stdout.splitlines():
                    job, _, user = line.strip().partition("|")
                    if user:
                        out[job.split("_", 1)[0]] = user
        return out

    def statuses(self, rows: list[Row], *, ask: bool = True) -> dict[str, dict[str, Any]]:
        """What happened to each row's job (as ``aimass status --json`` says it), in one
        scheduler call for the jobs not known to have ended.

        Without ``ask`` (filtering thousands of rows by state) a job whose ended state is
        recorded in its ``state.json`` is not asked about. A job the scheduler no longer knows
        (purged from accounting) shows its recorded outcome, where there is one.
        """
        out: dict[str, dict[str, Any]] = {}
        pending: list[Row] = []
        for row in rows:
            with self._lock:
                final = self._final.get(row.job_id)
            if final is not None:
                out[row.job_id] = final
            elif not ask and row.recorded and row.recorded.get("state") in _TERMINAL:
                out[row.job_id] = _recorded(row.recorded)
            else:
                pending.append(row)
        if pending:
            answered = self.scheduler.status([r.job_id for r in pending])
            for row in pending:
                st = answered[row.job_id]
                if (st.not_found or st.lookup_failed) and row.recorded:
                    shown = _recorded(row.recorded)
                    ended = shown["state"] in _TERMINAL
                else:
                    shown, ended = self._shown(st, row), st.is_terminal
                if ended:
                    with self._lock:
                        self._final[row.job_id] = shown
                out[row.job_id] = shown
        return out

    @staticmethod
    def _shown(st: JobStatus, row: Row) -> dict[str, Any]:
        """A status corrected by the run directory (result.json, logs), as ``aimass status``
        shows it; an ended job's outcome is recorded in its ``state.json``."""
        outcome = settled_outcome(st, row.run)
        return {
            "state": outcome.state,
            "reason": outcome.reason,
            "elapsed": st.elapsed,
            "nodes": st.nodes,
            "restarts": st.restart_count,
        }

    def page(
        self, *, q: str = "", state: str = "", page: int = 1, page_size: int = 50
    ) -> dict[str, Any]:
        """One page of the viewer's jobs, newest first, filtered by name/id and state."""
        if state and state not in STATES:
            raise InputError(f"state: expected one of {', '.join(STATES)} (got {state!r})")
        rows = self.rows()
        owners = self.owners(rows)
        rows = [r for r in rows if visible(owners[r.job_id], self.viewer, self.admins)]
        if q:
            needle = q.lower()
            rows = [r for r in rows if needle in r.name.lower() or needle in r.job_id]
        if state:
            shown = self.statuses(rows, ask=False)
            rows = [r for r in rows if shown[r.job_id]["state"] == state]
        out = page_of(rows, page, page_size)
        chunk: list[Row] = out["rows"]
        shown = self.statuses(chunk)
        out["rows"] = [
            {
                "job_id": r.job_id,
                "name": r.name,
                "owner": owners[r.job_id],
                "run_dir": str(r.run.path),
                "gpus": self._gpus(r.run),
                "progress": self._progress(r.run),
                **shown[r.job_id],
            }
            for r in chunk
        ]
        return out

    # ------------------------------------------------------------------ one job

    def find(self, job_id: str) -> Row:
        """The viewer's job ``job_id``; NotFoundError for an unknown id or another user's job
        (the same answer, so that ids of other users' jobs are not revealed)."""
        for row in self.rows():
            if row.job_id == job_id:
                if visible(self.owners([row])[job_id], self.viewer, self.admins):
                    return row
                break
        raise NotFoundError(f"job {job_id}: no such job of user {self.viewer}")

    def detail(self, job_id: str) -> dict[str, Any]:
        """Spec, script, status and log files of one job."""
        row = self.find(job_id)
        run = row.run
        spec: Any = None
        with contextlib.suppress(OSError, ValueError):
            spec = run.read_spec()
        script = _read_text(run.script_path)
        logs = [
            {"restart": _restart_of(p), "file": p.name, "bytes": _size(p)} for p in run.log_files()
        ]
        return {
            "job_id": job_id,
            "name": row.name,
            "owner": self.owners([row])[job_id],
            "run_dir": str(run.path),
            "status": self.statuses([row])[job_id],
            "spec": spec,
            "script": script,
            "logs": logs,
            "gpus": self._gpus(run),
        }

    def log(
        self, job_id: str, restart: int | None = None, rank: int | None = None, offset: int = 0
    ) -> dict[str, Any]:
        """Log text of one restart (default: the latest) from ``offset``; only whole lines of
        ``rank`` when given (then always from the start)."""
        row = self.find(job_id)
        path = row.run.log_file(restart)
        if path is None:
            what = f"restart {restart}" if restart is not None else "any restart"
            raise NotFoundError(f"job {job_id}: no log of {what} yet")
        with open(path, "rb") as fh:
            if rank is None:
                fh.seek(offset)
            data = fh.read() if rank is not None else fh.read(LOG_CHUNK)
        text = data.decode("utf-8", errors="replace")
        if rank is not None:
            text = "".join(line + "\n" for line in rank_lines(text, rank))
            return {"file": path.name, "text": text, "offset": len(data), "rank": rank}
        return {"file": path.name, "text": text, "offset": offset + len(data), "rank": None}

    def metrics(self, job_id: str) -> dict[str, Any]:
        """The run's metric records (``metrics.jsonl``), resumed steps dropped."""
        row = self.find(job_id)
        try:
            records = read_metrics(row.run.path)
        except FileNotFoundError:
            records = []
        return {"job_id": job_id, "records": records}

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel the viewer's job; says whether it was still active."""
        self.find(job_id)
        cancelled = self.scheduler.cancel([job_id])
        with self._lock:
            self._final.pop(job_id, None)
        return {"job_id": job_id, "cancelled": job_id in cancelled}


_TERMINAL = {s.value for s in JobState if s.is_terminal}


def _recorded(outcome: dict[str, Any]) -> dict[str, Any]:
    """A status from the outcome ``aimass status`` recorded in ``state.json``."""
    return {
        "state": str(outcome.get("state") or "UNKNOWN"),
        "reason": str(outcome.get("reason") or ""),
        "elapsed": None,
        "nodes": "",
        "restarts": 0,
    }


def _gpus(run: RunDir) -> Any:
    """Nodes x GPUs the spec asked for, where the spec says (``{"nodes", "gpus_per_node"}``)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        spec = run.read_spec()
        job = spec.get("request") or spec.get("job") or spec
        nodes, gpus = job.get("nodes"), job.get("gpus_per_node")
        if nodes is not None or gpus is not None:
            return {"nodes": nodes, "gpus_per_node": gpus}
    return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _restart_of(path: Path) -> int | None:
    digits = path.stem.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else None


def _all_runs(root: Path) -> list[RunDir]:
    """The runs root's runs and its searches' trial runs (``searches/*/trials``)."""
    runs = list_runs(root, limit=None)
    with contextlib.suppress(OSError):
        for search_dir in (root / "searches").iterdir():
            runs += list_runs(search_dir / "trials", limit=None)
    return runs
