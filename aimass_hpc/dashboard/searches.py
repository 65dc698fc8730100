"""The dashboard's Searches pages and their JSON API.

Searches are the directories under ``<runs root>/searches`` holding a journal (what
``aimass search list`` shows). A viewer sees the searches whose journal file they own (the
file system's word, like a run directory's owner); admins see every search.

Each search's :class:`~aimass_hpc.launch.journal.Journal` is kept between requests and its
``state()`` applies only the records appended since the last read, so polling a search of
thousands of trials costs a stat and a sort, never a replay. Trials are paged, sorted and
filtered here, on the server.

Parameter importance (:func:`importance`) is a documented, simple estimate: for each
parameter, the correlation ratio (eta squared) of the finished trials' objective *ranks* over
the parameter's values put into bins (a categorical's choices; a number's quantile bins). 0
means the objective's rank does not depend on the bin at all, 1 that the bin decides it.
"""

# No "from __future__ import annotations" (FastAPI resolves the Annotated aliases).
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from aimass_hpc.common.errors import AimassError, ConflictError, InputError, NotFoundError
from aimass_hpc.config.search_spec import SearchSpec
from aimass_hpc.dashboard.jobs import visible
from aimass_hpc.dashboard.paging import Paged, PageNo, PageSize, page_of, path_owner
from aimass_hpc.launch import journal as J
from aimass_hpc.launch import search_driver as D
from aimass_hpc.launch import search_launch as L
from aimass_hpc.launch.search_plots import axis_position, best_so_far

if TYPE_CHECKING:
    from aimass_hpc.dashboard.app import Ctx

SEARCH_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"
TRIAL_STATES = (J.PROPOSED, J.SUBMITTED, J.RUNNING, J.LOST, J.FINISHED, J.FAILED, J.PRUNED,
                J.CANCELLED)  # fmt: skip
COLUMNS = ("id", "state", "value", "job_id", "attempts", "duration")
IMPORTANCE_BINS = 5
PLOT_LINES = 2000  # parallel-coordinates lines at most (the best ones)
CANCEL_WAIT_S = 20.0  # how long a cancel waits for a live driver to stop the trials


def importance(
    trials: list[J.TrialRecord], names: list[str], bins: int = IMPORTANCE_BINS
) -> list[dict[str, Any]]:
    """Per parameter: eta squared of the finished trials' objective ranks over binned values.

    ``sum_b n_b (mean_b - mean)^2 / sum_i (r_i - mean)^2`` where ``r`` are the ranks of the
    objective (ties share their mean rank, so the estimate ignores the objective's scale and
    outliers) and the bins are a categorical's values, or ``bins`` quantile bins of a number
    (fewer when there are fewer distinct values). Trials without the parameter (an inactive
    conditional one) form a bin of their own. Sorted, most important first.
    """
    done = [t for t in trials if t.state == J.FINISHED and _number(t.value) is not None]
    if len(done) < 2:
        return []
    ranks = _ranks([float(t.value) for t in done])  # type: ignore[arg-type]
    mean = sum(ranks) / len(ranks)
    total = sum((r - mean) ** 2 for r in ranks)
    out: list[dict[str, Any]] = []
    for name in names:
        keys = _bins([t.params.get(name) for t in done], bins)
        groups: dict[Any, list[float]] = {}
        for key, r in zip(keys, ranks, strict=True):
            groups.setdefault(key, []).append(r)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        out.append({"param": name, "importance": between / total if total else 0.0,
                    "bins": len(groups)})  # fmt: skip
    out.sort(key=lambda d: -float(d["importance"]))
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return None if math.isnan(f) else f


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def _bins(values: list[Any], bins: int) -> list[Any]:
    """A bin key per value: numbers by quantile edges, anything else by its text."""
    nums = sorted({n for v in values if (n := _number(v)) is not None})
    if len(nums) <= bins:
        edges = nums
    else:
        edges = [nums[min(len(nums) - 1, (len(nums) * b) // bins)] for b in range(bins)]
    out: list[Any] = []
    for v in values:
        n = _number(v)
        if v is None:
            out.append(("missing",))
        elif n is None:
            out.append(("text", str(v)))
        else:
            out.append(("bin", sum(1 for e in edges if e <= n)))
    return out


def _sort_key(column: str, t: J.TrialRecord) -> tuple[Any, ...]:
    """Missing values last; numbers before text; then the value."""
    if column == "id":
        v: Any = t.id
    elif column == "duration":
        v = t.duration
    elif column.startswith("param:"):
        v = t.params.get(column[len("param:") :])
    else:
        v = getattr(t, column)
    if v is None:
        return (1, 0, 0.0, "")
    n = _number(v)
    return (0, 0, n, "") if n is not None else (0, 1, 0.0, str(v))


@dataclass
class _Cached:
    journal: J.Journal
    spec: SearchSpec | None = None


class SearchesView:
    """The viewer's searches under a site's runs root, read incrementally."""

    def __init__(self, ctx: "Ctx") -> None:
        self.ctx = ctx
        self.root = L.searches_root(ctx.site)
        self._cache: dict[Path, _Cached] = {}
        # A cached SearchState is updated in place by the next read: a request holds this
        # while it reads a state, so that no other request applies records meanwhile.
        self.lock = threading.RLock()

    # ------------------------------------------------------------------ reading

    def _visible(self, path: Path) -> bool:
        jobs = self.ctx.jobs
        return visible(path_owner(path / J.JOURNAL_NAME), jobs.viewer, jobs.admins)

    def _state(self, path: Path) -> tuple[J.SearchState, _Cached]:
        """The search's state, brought up to date with what was appended since last time."""
        with self.lock:
            cached = self._cache.get(path)
            if cached is None:
                cached = self._cache[path] = _Cached(D.SearchDir(path).journal())
            try:
                return cached.journal.state(), cached
            except OSError as exc:  # removed since: forget it
                self._cache.pop(path, None)
                raise NotFoundError(f"search {path.name}: {exc.strerror or exc}") from None

    def _spec(self, path: Path, state: J.SearchState, cached: _Cached) -> SearchSpec:
        if cached.spec is None:  # the journaled spec never changes: validated once
            cached.spec = D.SearchDir(path).spec(state)
        return cached.spec

    def find(self, sid: str) -> Path:
        """The viewer's search ``sid`` (a directory name under the searches root);
        NotFoundError for an unknown one or another user's (the same answer)."""
        path = self.root / sid
        if (path / J.JOURNAL_NAME).is_file() and self._visible(path):
            return path
        raise NotFoundError(f"search {sid}: no such search of user {self.ctx.jobs.viewer}")

    def summary(self, path: Path) -> dict[str, Any]:
        """One search as the list shows it (``aimass search list``'s fields)."""
        try:
            state, _ = self._state(path)
            settings = L.journaled_settings(state)
        except AimassError as exc:
            return {"id": path.name, "name": path.name, "state": "damaged", "note": str(exc)[:200],
                    "trials_done": 0, "trials": 0, "budget": None, "best_value": None,
                    "best_trial": None, "best_ref": None, "created_at": None}  # fmt: skip
        s = L.summarize_state(D.SearchDir(path), state, settings)
        return {
            "id": path.name,
            "name": s.name,
            "state": s.state,
            "note": "",
            "trials_done": s.done,
            "trials": state.n_proposed,
            "budget": s.budget,
            "best_value": s.best_value,
            "best_trial": s.best_trial,
            "best_ref": s.best_ref,
            "created_at": s.created_at,
            "direction": settings.get("direction"),
            "metric": settings.get("metric"),
            "sampler": settings.get("sampler"),
        }

    def listing(self, q: str = "", page: int = 1, page_size: int = 50) -> dict[str, Any]:
        """One page of the viewer's searches, newest first, filtered by name."""
        try:
            entries = [p for p in self.root.iterdir() if (p / J.JOURNAL_NAME).is_file()]
        except FileNotFoundError:
            entries = []
        entries = [p for p in entries if self._visible(p)]
        rows = [self.summary(p) for p in entries]
        if q:
            needle = q.lower()
            rows = [r for r in rows if needle in r["name"].lower() or needle in r["id"].lower()]
        rows.sort(key=lambda r: (r["created_at"] or 0.0, r["id"]), reverse=True)
        return page_of(rows, page, page_size)

    def detail(self, sid: str) -> dict[str, Any]:
        """Settings, counts, best trial, driver and parameter names of one search."""
        path = self.find(sid)
        state, cached = self._state(path)
        spec = self._spec(path, state, cached)
        sdir = D.SearchDir(path)
        holder = L.driver_holder(sdir)
        driver = None
        if holder is not None:
            driver = {"pid": holder.pid, "host": holder.host, "beat_s": holder.heartbeat_age_s}
        return {
            **self.summary(path),
            **L.describe_search(sdir, state, spec),
            "cancel_requested": state.cancel_requested,
            "driver": driver,
            "driver_jobs": [d.get("job_id") for d in state.driver_jobs],
            "params": list(spec.space_obj().names),
            "states": list(TRIAL_STATES),
            "columns": [*COLUMNS, *(f"param:{n}" for n in spec.space_obj().names)],
        }

    def trials(
        self, sid: str, *, state: str = "", sort: str = "id", order: str = "asc",
        page: int = 1, page_size: int = 50,
    ) -> dict[str, Any]:  # fmt: skip
        """One page of trials, filtered by state, sorted by a column (or ``param:NAME``)."""
        if state and state not in TRIAL_STATES:
            raise InputError(f"state: expected one of {', '.join(TRIAL_STATES)} (got {state!r})")
        path = self.find(sid)
        st, cached = self._state(path)
        names = self._spec(path, st, cached).space_obj().names
        if sort not in COLUMNS and not (sort.startswith("param:") and sort[6:] in names):
            allowed = ", ".join([*COLUMNS, *(f"param:{n}" for n in names)])
            raise InputError(f"sort: expected one of {allowed} (got {sort!r})")
        rows = list(st.trials.values())
        if state:
            rows = [t for t in rows if t.state == state]
        if sort != "id" or order != "asc":
            present = [t for t in rows if _sort_key(sort, t)[0] == 0]
            missing = [t for t in rows if _sort_key(sort, t)[0] == 1]
            present.sort(key=lambda t: _sort_key(sort, t), reverse=order == "desc")
            rows = present + missing  # no value: last either way
        out = page_of(rows, page, page_size, sort=sort, order=order)
        out["rows"] = [t.to_dict() for t in out["rows"]]
        return out

    def plots(self, sid: str) -> dict[str, Any]:
        """Best so far (by completion), parallel coordinates on [0, 1] axes, importance."""
        path = self.find(sid)
        st, cached = self._state(path)
        spec = self._spec(path, st, cached)
        direction = spec.search.direction
        space = spec.space_obj()
        done = [
            t for t in st.trials.values() if t.state == J.FINISHED and _number(t.value) is not None
        ]
        done.sort(key=lambda t: (t.ended_at or 0.0, t.id))  # completion order (as `search plot`)
        values = [float(t.value) for t in done]  # type: ignore[arg-type]
        best = best_so_far(values, direction)
        curve = [{"n": i + 1, "trial": t.id, "value": v, "best": b}
                 for i, (t, v, b) in enumerate(zip(done, values, best, strict=True))]  # fmt: skip
        names = list(space.names)
        # The best PLOT_LINES trials only: a thousand lines are still readable, more are not.
        ranked = sorted(range(len(done)), key=lambda i: values[i], reverse=direction != "minimize")
        keep = sorted(ranked[:PLOT_LINES])
        shown = [done[i] for i in keep]
        axes = []
        columns = []
        for name in [*names, "objective"]:
            raw = (
                [t.params.get(name) for t in shown]
                if name != "objective"
                else [values[i] for i in keep]
            )
            pos, (tick_pos, tick_labels) = axis_position(
                space if name != "objective" else None, name, raw
            )
            columns.append(pos)
            axes.append({"name": name, "ticks": [{"pos": p, "label": str(lbl)}
                         for p, lbl in zip(tick_pos, tick_labels, strict=True)]})  # fmt: skip
        lines = [{"trial": t.id, "value": values[i],
                  "pos": [None if math.isnan(c[k]) else c[k] for c in columns]}
                 for k, (i, t) in enumerate(zip(keep, shown, strict=True))]  # fmt: skip
        return {"direction": direction, "best_so_far": curve,
                "parallel": {"axes": axes, "lines": lines, "of": len(done)},
                "importance": importance(done, names)}  # fmt: skip

    # ------------------------------------------------------------------ actions

    def cancel(self, sid: str) -> dict[str, Any]:
        """``aimass search cancel``: journal the request, stop the trials and driver jobs."""
        path = self.find(sid)
        sdir = D.SearchDir(path)
        state, _ = self._state(path)
        L.cancel_search(sdir, state, None, wait_s=CANCEL_WAIT_S)
        state, _ = self._state(path)
        return {"id": sid, "cancelled": state.cancel_requested, "finished": state.finished}

    def resume(self, sid: str) -> dict[str, Any]:
        """Continue a stopped search as ``aimass search run --detach`` would drive it: its
        driver as a small CPU job (``aimass search resume DIR``), journaled."""
        from aimass_hpc.launch.scheduler import get_scheduler
        from aimass_hpc.launch.submit import submit

        path = self.find(sid)
        sdir = D.SearchDir(path)
        state, cached = self._state(path)
        if state.finished:
            raise ConflictError(f"search {sid} has already finished")
        holder = L.driver_holder(sdir)
        if holder is not None:
            raise ConflictError(
                f"search {sid} is being driven by pid {holder.pid} on {holder.host}"
            )
        site = L.search_site(None, sdir)
        queued = [str(d["job_id"]) for d in state.driver_jobs if d.get("job_id")]
        if queued:
            live = [i for i, s in get_scheduler(site).status(queued).items() if not s.is_terminal]
            if live:
                raise ConflictError(f"search {sid}: driver job {live[0]} is queued already")
        spec = self._spec(path, state, cached)
        sub = submit(site, D.driver_request(spec, site, sdir),
                     spec={"search_dir": str(path), "role": "search driver"},
                     runs_root=sdir.driver_root)  # fmt: skip
        sdir.journal().append(
            J.DRIVER_SUBMITTED, job_id=str(sub.job_id), run_dir=str(sub.run_dir.path)
        )
        return {"id": sid, "driver_job_id": sub.job_id}


def add_routes(app: FastAPI, ctx: "Ctx") -> None:
    """Add the Searches pages and their API to ``app``."""
    view = SearchesView(ctx)
    Sid = Annotated[str, PathParam(pattern=SEARCH_ID, max_length=200)]
    Reader, Writer = ctx.reader, ctx.writer

    @app.get("/searches", include_in_schema=False)
    def searches_page(request: Request) -> Response:
        return ctx.page("searches.html", request, page_name="searches")

    @app.get("/searches/{sid}", include_in_schema=False)
    def search_page(request: Request, sid: Sid) -> Response:
        return ctx.page("search.html", request, page_name="search", search=sid,
                        trial_states=TRIAL_STATES)  # fmt: skip

    @app.get("/api/searches")
    def list_searches(_: Reader, paging: Paged) -> dict[str, Any]:  # type: ignore[valid-type]
        """The viewer's searches, newest first: name, state, trials done/budget, best."""
        with view.lock:
            return view.listing(q=paging.q, page=paging.page, page_size=paging.page_size)

    @app.get("/api/searches/{sid}")
    def search_detail(_: Reader, sid: Sid) -> dict[str, Any]:  # type: ignore[valid-type]
        """One search: settings, trial counts, best trial, driver."""
        with view.lock:
            return view.detail(sid)

    @app.get("/api/searches/{sid}/trials")
    def search_trials(
        _: Reader,  # type: ignore[valid-type]
        sid: Sid,
        state: Annotated[str, Query(max_length=20)] = "",
        sort: Annotated[str, Query(max_length=120)] = "id",
        order: Annotated[str, Query(pattern="^(asc|desc)$")] = "asc",
        page: PageNo = 1,
        page_size: PageSize = 50,
    ) -> dict[str, Any]:
        """One page of trials, filtered by state and sorted by any column."""
        with view.lock:
            return view.trials(sid, state=state, sort=sort, order=order, page=page,
                               page_size=page_size)  # fmt: skip

    @app.get("/api/searches/{sid}/plots")
    def search_plots(_: Reader, sid: Sid) -> dict[str, Any]:  # type: ignore[valid-type]
        """Best so far, parallel coordinates and parameter importance, as data."""
        with view.lock:
            return view.plots(sid)

    @app.post("/api/searches/{sid}/cancel")
    def search_cancel(_: Writer, sid: Sid) -> dict[str, Any]:  # type: ignore[valid-type]
        """Cancel the search, its queued and running trials and its driver jobs."""
        return view.cancel(sid)

    @app.post("/api/searches/{sid}/resume")
    def search_resume(_: Writer, sid: Sid) -> dict[str, Any]:  # type: ignore[valid-type]
        """Continue a stopped search: submit its driver as a batch job."""
        return view.resume(sid)


__all__ = ["SearchesView", "add_routes", "importance"]
