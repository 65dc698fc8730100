"""The dashboard's Training page and its JSON API.

A training run is any of the viewer's jobs (:class:`~aimass_hpc.dashboard.jobs.JobsView`:
same visibility, same run directories) whose run directory holds a ``metrics.jsonl`` (what
the trainer's rank 0, or a script's ``aimass_hpc.runtime`` metrics, writes). Curves are the
numeric fields of its ``step`` and ``epoch`` records against the step, for one run or several
overlaid; a long run's series are thinned to at most :data:`MAX_POINTS` points each.
"""

# No "from __future__ import annotations" (FastAPI resolves the Annotated aliases).
import re
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from aimass_hpc.common.errors import InputError
from aimass_hpc.dashboard.jobs import visible
from aimass_hpc.dashboard.paging import Paged
from aimass_hpc.runtime.metrics import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from aimass_hpc.dashboard.app import Ctx

MAX_RUNS = 12  # runs overlaid at once
MAX_POINTS = 2000  # points per series sent to the browser
_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?")
_SKIP = {"kind", "step", "time", "epoch", "event"}  # not curves


def parse_runs(text: str) -> list[str]:
    """``"123,124"`` -> ``["123", "124"]`` (order kept, duplicates dropped); InputError for
    anything but job ids, or more than :data:`MAX_RUNS`."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not _JOB_ID.fullmatch(part) or len(part) > 40:
            raise InputError(f"runs: expected job ids separated by commas (got {part[:40]!r})")
        if part not in out:
            out.append(part)
    if not out:
        raise InputError("runs: name at least one job id (runs=123,124)")
    if len(out) > MAX_RUNS:
        raise InputError(f"runs: at most {MAX_RUNS} runs at once (got {len(out)})")
    return out


def curves(records: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """``{"step": {key: [[step, value], ...]}, "epoch": {...}}`` of every numeric field."""
    out: dict[str, dict[str, list[list[float]]]] = {"step": {}, "epoch": {}}
    for rec in records:
        kind = rec.get("kind")
        if kind not in out:
            continue
        step = rec.get("step")
        if not isinstance(step, int | float) or isinstance(step, bool):
            continue
        for key, value in rec.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            out[kind].setdefault(key, []).append([step, value])
    for series in out.values():
        for key, points in series.items():
            series[key] = _thin(points)
    return out


def _thin(points: list[list[float]]) -> list[list[float]]:
    """Every k-th point (and the last), so that at most MAX_POINTS remain."""
    if len(points) <= MAX_POINTS:
        return points
    k = -(-len(points) // MAX_POINTS)
    kept = points[::k]
    if kept[-1] is not points[-1]:
        kept.append(points[-1])
    return kept


def add_routes(app: FastAPI, ctx: "Ctx") -> None:
    """Add the Training page and its API to ``app``."""
    jobs = ctx.jobs
    Reader = ctx.reader

    @app.get("/training", include_in_schema=False)
    def training_page(request: Request) -> Response:
        return ctx.page("training.html", request, page_name="training", max_runs=MAX_RUNS)

    @app.get("/api/training")
    def list_training(_: Reader, paging: Paged) -> dict[str, Any]:  # type: ignore[valid-type]
        """The viewer's training runs (jobs with metrics), newest first: state, step, last
        loss and metrics. Only the page's jobs are asked about and summarized."""
        rows = [r for r in jobs.rows() if (r.run.path / METRICS_FILE).is_file()]
        owners = jobs.owners(rows)
        rows = [r for r in rows if visible(owners[r.job_id], jobs.viewer, jobs.admins)]
        if paging.q:
            needle = paging.q.lower()
            rows = [r for r in rows if needle in r.name.lower() or needle in r.job_id]
        out = paging.of(rows)
        chunk = out["rows"]
        shown = jobs.statuses(chunk)
        listed = []
        for r in chunk:
            try:
                summary = jobs.summary(r.run) or {}
            except (OSError, ValueError):
                summary = {}
            listed.append({
                "job_id": r.job_id, "name": r.name, "state": shown[r.job_id]["state"],
                "elapsed": shown[r.job_id]["elapsed"], "step": summary.get("step"),
                "total_steps": summary.get("total_steps"), "loss": summary.get("loss"),
                "samples_per_s": summary.get("samples_per_s"),
                "metrics": summary.get("metrics") or {},
            })  # fmt: skip
        out["rows"] = listed
        return out

    @app.get("/api/training/curves")
    def training_curves(
        _: Reader,  # type: ignore[valid-type]
        runs: Annotated[str, Query(max_length=1000)] = "",
    ) -> dict[str, Any]:
        """Loss, metric and throughput curves of each run in ``runs`` (``123,124``)."""
        out = []
        for job_id in parse_runs(runs):
            row = jobs.find(job_id)  # NotFoundError for another user's run
            try:
                records = read_metrics(row.run.path)
            except FileNotFoundError:
                records = []
            out.append({"job_id": job_id, "name": row.name, **curves(records)})
        return {"runs": out}
