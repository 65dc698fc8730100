"""The dashboard's Services page and its JSON API.

A service is one run directory of ``aimass serve`` (its name here is the directory's name).
What the page shows comes from the same places as ``aimass endpoints`` and ``aimass serve
status``: the endpoint records (reconciled with the scheduler), ``desired.json``, the
supervisor's decisions, and each READY replica's ``/readyz`` and ``/metrics`` (with the
service's token). Actions call :mod:`aimass_hpc.launch.serving` as the CLI does; upgrade,
rollback and stop wait for replicas, so they run in a thread and the page follows them.
"""

# No "from __future__ import annotations" (FastAPI resolves the Annotated aliases).
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import httpx
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response
from pydantic import BaseModel, Field

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.dashboard.jobs import visible
from aimass_hpc.dashboard.paging import Paged, page_of, path_owner
from aimass_hpc.launch import serving
from aimass_hpc.repo.refs import Ref
from aimass_hpc.serve.auth import read_token, token_path
from aimass_hpc.serve.endpoints import (
    ENDPOINTS_DIRNAME,
    FINAL_STATES,
    EndpointRecord,
    EndpointState,
    read_records,
)

if TYPE_CHECKING:
    from aimass_hpc.dashboard.app import Ctx

SERVICE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$"  # a run directory's name
MAX_BENCH_S = 60.0  # the longest performance test the app runs (in its own process)
MAX_CONCURRENCY = 256
SCRAPE_TIMEOUT_S = 2.0
SERIES_POINTS = 120  # throughput/latency points kept per service (6 min at 3 s)
PREDICT_ROUTE = "/v1/predict"


# ---------------------------------------------------------------------------- request bodies


class StartBody(BaseModel):
    model: str = Field(min_length=1, max_length=200, description="NAME@ALIAS or NAME:VERSION")
    replicas: int = Field(1, ge=1, le=64)
    gpus: int = Field(0, ge=0, le=64, description="GPUs per replica")
    cpus: int = Field(2, ge=1, le=256, description="CPUs per replica")
    reservation: str | None = Field(None, max_length=200)
    time: str | None = Field(None, max_length=40, description="time limit per job")
    supervise: bool = False


class UpgradeBody(BaseModel):
    version: int | None = Field(None, ge=1, le=2**31, description="point the alias at it first")


class BenchBody(BaseModel):
    batch: int = Field(1, ge=1, le=4096, description="samples per request")
    shape: str = Field("", max_length=80, description="one sample's shape, e.g. 3,32,32")
    duration: float = Field(5.0, ge=0.2, le=MAX_BENCH_S, description="seconds measured")
    concurrency: int = Field(8, ge=1, le=MAX_CONCURRENCY)


# ---------------------------------------------------------------------------- metrics


def parse_metrics(text: str) -> dict[str, Any]:
    """A replica's ``/metrics`` text -> predict requests (ok, total), latency histogram
    (cumulative ``[(le, count)]``), samples, queue depth."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {"ok": 0.0, "requests": 0.0, "buckets": {}, "samples": 0.0,
                           "queue_depth": None}  # fmt: skip
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "aimass_serve_requests_total" and s.labels.get("route") == PREDICT_ROUTE:
                out["requests"] += s.value
                if s.labels.get("code") == "200":
                    out["ok"] += s.value
            elif (
                s.name == "aimass_serve_request_duration_seconds_bucket"
                and s.labels.get("route") == PREDICT_ROUTE
            ):
                le = float(s.labels["le"])
                out["buckets"][le] = out["buckets"].get(le, 0.0) + s.value
            elif s.name == "aimass_serve_samples_total":
                out["samples"] += s.value
            elif s.name == "aimass_serve_queue_depth":
                out["queue_depth"] = s.value
    out["buckets"] = sorted(out["buckets"].items())
    return out


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: the q-quantile (0..1) of cumulative buckets, by
    linear interpolation inside the bucket it falls in; None without observations."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return prev_le  # above the largest finite bound: that bound is the answer
            width = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / width if width else 1.0)
        prev_le, prev_count = le, count
    return prev_le


def _minus(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    before = dict(b)
    return [(le, max(0.0, c - before.get(le, 0.0))) for le, c in a]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


class Scraper:
    """Scrapes replicas' ``/metrics``; rates and windowed percentiles come from the
    difference with the previous scrape of the same replica (kept in memory)."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, dict[str, Any]]] = {}
        self._series: dict[str, deque[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="aimass-scrape")

    def _one(self, rec: EndpointRecord, token: str | None) -> dict[str, Any]:
        """Health and metrics of one replica (never raises: an error is a word)."""
        out: dict[str, Any] = {"health": serving.probe(rec, timeout=SCRAPE_TIMEOUT_S)}
        if rec.url is None or out["health"] in ("-", "down"):
            return out
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            resp = httpx.get(f"{rec.url}/metrics", headers=headers, timeout=SCRAPE_TIMEOUT_S,
                             trust_env=False)  # fmt: skip
            resp.raise_for_status()
            now = parse_metrics(resp.text)
        except (httpx.HTTPError, ValueError) as exc:
            out["metrics_error"] = f"{type(exc).__name__}: {exc}"[:200]
            return out
        t = time.monotonic()
        key = f"{rec.run_dir}/{rec.key}"
        with self._lock:
            prev = self._last.get(key)
            self._last[key] = (t, now)
        window = now["buckets"]
        out["requests_per_s"] = None
        if prev is not None and t > prev[0] and now["requests"] >= prev[1]["requests"]:
            dt = t - prev[0]
            out["requests_per_s"] = round((now["ok"] - prev[1]["ok"]) / dt, 2)
            out["samples_per_s"] = round((now["samples"] - prev[1]["samples"]) / dt, 2)
            delta = _minus(now["buckets"], prev[1]["buckets"])
            if delta and delta[-1][1] > 0:
                window = delta
        out.update(
            requests_ok=int(now["ok"]), requests=int(now["requests"]),
            queue_depth=now["queue_depth"],
            **{f"p{q}_ms": _ms(quantile(q / 100, window)) for q in (50, 95, 99)},
        )  # fmt: skip
        return out

    def scrape(self, name: str, records: list[EndpointRecord], token: str | None) -> list[Any]:
        """Health and metrics of every live replica, in parallel; adds a point to the
        service's series (summed throughput, worst p95)."""
        live = [r for r in records if EndpointState(r.state) not in FINAL_STATES]
        results = list(self._pool.map(lambda r: self._one(r, token), live))
        rates = [m["requests_per_s"] for m in results if m.get("requests_per_s") is not None]
        p95s = [m["p95_ms"] for m in results if m.get("p95_ms") is not None]
        if rates or p95s:
            with self._lock:
                series = self._series.setdefault(name, deque(maxlen=SERIES_POINTS))
                series.append({"t": time.time(), "requests_per_s": round(sum(rates), 2),
                               "p95_ms": max(p95s) if p95s else None})  # fmt: skip
        return results

    def series(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._series.get(name, ()))


# ---------------------------------------------------------------------------- the load test


def run_bench(urls: list[str], token: str, body: BenchBody) -> dict[str, Any]:
    """``aimass bench`` against ``urls`` (the same load test); blocks for ``1 + duration``
    seconds (call it from a worker thread)."""
    from aimass_hpc.serve.bench import bench_service, parse_shape
    from aimass_hpc.serve.client import Client

    dims = parse_shape(body.shape, "shape") if body.shape else None
    with Client(",".join(urls), token=token, retry_timeout=10) as client:
        return bench_service(
            client, batch=body.batch, shape=dims, concurrency=body.concurrency,
            duration=body.duration,
        )  # fmt: skip


# ---------------------------------------------------------------------------- the view


def _service_dirs(root: Path) -> list[Path]:
    """The run directories under ``root`` that hold endpoint records (``aimass serve`` and
    the dashboard start services in the runs root itself).

    One listing of the root and a stat per entry: unlike
    :func:`~aimass_hpc.serve.endpoints.find_records`, which globs every run directory's
    subdirectories a few levels deep, costly at thousands of runs.
    """
    try:
        with os.scandir(root) as it:
            entries = [e.path for e in it if not e.name.startswith(".") and e.is_dir()]
    except OSError:  # no runs root yet: no services
        return []
    return [Path(p) for p in entries if os.path.isdir(os.path.join(p, ENDPOINTS_DIRNAME))]


def _running(op: dict[str, Any] | None) -> bool:
    return op is not None and op.get("state") == "running"


class ServicesView:
    """The services under one site's runs root, as one viewer may see and act on them."""

    def __init__(self, ctx: "Ctx") -> None:
        self.ctx = ctx
        self.site = ctx.site
        self.scraper = Scraper()
        self._ops: dict[str, dict[str, Any]] = {}  # name -> the last long action
        self._lock = threading.Lock()
        self._bench = threading.Lock()  # one load test at a time in this process

    # -- finding services --------------------------------------------------------------------

    def _groups(self) -> dict[str, list[EndpointRecord]]:
        """Records by run directory name (the viewer's services only)."""
        groups: dict[str, list[EndpointRecord]] = {}
        dirs: dict[str, Path] = {}
        records = [rec for path in _service_dirs(self.site.runs_root) for rec in read_records(path)]
        records.sort(key=lambda r: (r.started, r.key))  # as find_records orders them
        for rec in records:
            path = Path(rec.run_dir)
            groups.setdefault(path.name, []).append(rec)
            dirs[path.name] = path
        return {
            n: recs for n, recs in groups.items()
            if visible(path_owner(dirs[n]), self.ctx.viewer, self.ctx.jobs.admins)
        }  # fmt: skip

    def _records(self, name: str) -> list[EndpointRecord]:
        recs = self._groups().get(name)
        if not recs:
            raise NotFoundError(f"service {name!r}: no such service of user {self.ctx.viewer}")
        return recs

    def _summary(self, name: str, recs: list[EndpointRecord]) -> dict[str, Any]:
        run_dir = Path(recs[0].run_dir)
        desired = serving.read_desired(run_dir) or {}
        counts: dict[str, int] = {}
        for r in recs:
            counts[r.state] = counts.get(r.state, 0) + 1
        live = [r for r in recs if EndpointState(r.state) not in FINAL_STATES]
        return {
            "name": name,
            "model": desired.get("model") or recs[0].model_ref,
            "run_dir": str(run_dir),
            "live": bool(live),
            "desired_replicas": desired.get("replicas"),
            "desired_state": desired.get("state", "running"),
            "ready_replicas": counts.get("READY", 0),
            "states": counts,
            "versions": sorted({str(r.version) for r in live if r.version is not None}),
            "nodes": sorted({r.node for r in live if r.node}),
            "supervised": bool(desired.get("supervise")),
            "started": min(r.started for r in recs),
            "operation": self._op(name),
        }

    def page(self, *, q: str = "", show: str = "live", page: int = 1,
             page_size: int = 50) -> dict[str, Any]:  # fmt: skip
        """One page of the viewer's services, newest first (``show=all``: stopped ones too)."""
        groups = self._groups()
        # One scheduler call for every live record (a job that ended without saying so).
        live = [r for recs in groups.values() for r in recs
                if EndpointState(r.state) not in FINAL_STATES]  # fmt: skip
        serving.reconcile(self.site, live)
        rows = [self._summary(n, recs) for n, recs in groups.items()]
        if show == "live":
            rows = [
                r for r in rows if r["live"] or (r["operation"] or {}).get("state") == "running"
            ]
        if q:
            needle = q.lower()
            rows = [r for r in rows if needle in r["name"].lower() or needle in r["model"].lower()]
        rows.sort(key=lambda r: r["started"], reverse=True)
        return page_of(rows, page, page_size)

    def detail(self, name: str) -> dict[str, Any]:
        """Replicas with health, version, node, history and metrics; desired vs actual;
        the supervisor's last decisions; the throughput/latency series."""
        recs = self._records(name)
        run_dir = Path(recs[0].run_dir)
        status = serving.service_status(self.site, run_dir, decisions=20)
        recs = serving.reconcile(self.site, recs)
        token = self._token(run_dir)
        shown = sorted(recs, key=lambda r: (r.replica, r.started))
        metrics = dict(zip([id(r) for r in shown if EndpointState(r.state) not in FINAL_STATES],
                           self.scraper.scrape(name, shown, token), strict=True))  # fmt: skip
        replicas = [{**r.to_dict(), **metrics.get(id(r), {"health": "-"})} for r in shown]
        for rep in replicas:
            rep.pop("token_file", None)
        summary = self._summary(name, recs)
        return {
            **summary,
            "status": {k: v for k, v in status.items() if k != "replicas"},
            "replicas": replicas,
            "series": self.scraper.series(name),
            "alias": self._alias(summary["model"]),
        }

    @staticmethod
    def _token(run_dir: Path) -> str | None:
        try:
            return read_token(token_path(run_dir))
        except (NotFoundError, InputError):
            return None

    @staticmethod
    def _alias(model: str) -> str | None:
        try:
            ref = Ref.parse(model)
        except InputError:
            return None
        return ref.alias if ref.alias and ref.alias != "latest" else None

    # -- actions -----------------------------------------------------------------------------

    def start(self, body: StartBody) -> dict[str, Any]:
        """``aimass serve start``: submit the replicas (and a supervisor with ``supervise``)."""
        opts = serving.ServeOptions(
            ref=body.model, replicas=body.replicas, gpus=body.gpus, cpus=body.cpus,
            reservation=body.reservation or None, time=body.time or None,
            supervise=body.supervise,
        )  # fmt: skip
        if self.ctx.repo.root != Path(self.site.models_root).expanduser().absolute():
            opts.repo = str(self.ctx.repo.root)
        sub = serving.start_service(self.site, opts)
        return {"name": sub.run_dir.path.name, "job_id": sub.job_id,
                "run_dir": str(sub.run_dir.path), "replicas": opts.replicas}  # fmt: skip

    def _op(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            op = self._ops.get(name)
            return dict(op) if op else None

    def _idle(self, name: str) -> None:
        """ConflictError while an action on the service is still running."""
        op = self._op(name)
        if op and op["state"] == "running":
            raise ConflictError(f"service {name}: {op['action']} is still running")

    def _background(self, name: str, action: str, fn: Any) -> dict[str, Any]:
        """Run ``fn()`` in a thread, remembered as the service's operation (one at a time)."""
        with self._lock:
            cur = self._ops.get(name)
            if cur and cur["state"] == "running":
                raise ConflictError(f"service {name}: {cur['action']} is still running")
            op = {"action": action, "state": "running", "started": time.time(),
                  "result": None, "error": None}  # fmt: skip
            self._ops[name] = op

        def work() -> None:
            try:
                result = fn()
                with self._lock:
                    op.update(state="done", result=result, finished=time.time())
            except Exception as exc:  # shown on the page, one line
                text = str(exc).strip().splitlines()
                with self._lock:
                    op.update(state="failed", finished=time.time(),
                              error=text[0] if text else type(exc).__name__)  # fmt: skip

        threading.Thread(target=work, name=f"aimass-{action}", daemon=True).start()
        return {"name": name, "operation": dict(op)}

    def _live_ref(self, name: str) -> tuple[str, list[EndpointRecord]]:
        recs = serving.reconcile(self.site, self._records(name))
        live = [r for r in recs if EndpointState(r.state) not in FINAL_STATES]
        if not live:
            raise ConflictError(f"service {name}: no live replica")
        return live[0].model_ref, live

    def upgrade(self, name: str, version: int | None) -> dict[str, Any]:
        """``aimass serve upgrade`` (blue/green); with ``version`` the service's alias is
        pointed at it first (``aimass models promote``)."""
        ref, _ = self._live_ref(name)
        parsed = Ref.parse(ref, "model")
        alias = self._alias(ref)
        if version is not None and alias is None:
            raise InputError(
                f"version: service {name} serves {ref}, not an alias; start NAME@ALIAS to "
                "upgrade it"
            )
        self._idle(name)
        if version is not None and alias is not None:
            self.ctx.repo.promote(parsed.name, version, alias)  # quick: done before answering
        site = self.site

        def work() -> dict[str, Any]:
            return serving.upgrade(site, ref).to_dict()

        return self._background(name, "upgrade", work)

    def rollback(self, name: str) -> dict[str, Any]:
        """``aimass models rollback NAME@ALIAS`` then ``aimass serve upgrade NAME@ALIAS``."""
        ref, _ = self._live_ref(name)
        alias = self._alias(ref)
        if alias is None:
            raise InputError(f"service {name} serves {ref}, not an alias: nothing to roll back")
        parsed = Ref.parse(ref, "model")
        self._idle(name)
        back = self.ctx.repo.rollback(parsed.name, alias)  # ConflictError: no previous target
        site = self.site

        def work() -> dict[str, Any]:
            return {**serving.upgrade(site, ref).to_dict(), "rolled_back_to": back.ref}

        return self._background(name, "rollback", work)

    def stop(self, name: str) -> dict[str, Any]:
        """``aimass serve stop RUN_DIR``: supervisor, replicas (they drain), queued jobs."""
        _, live = self._live_ref(name)
        site = self.site
        return self._background(
            name, "stop", lambda: {"cancelled": serving.stop_service(site, live, wait=True)}
        )

    def bench(self, name: str, body: BenchBody) -> dict[str, Any]:
        """The ``aimass bench`` load test against this service's READY replicas."""
        recs = serving.reconcile(self.site, self._records(name))
        ready = [r for r in recs if r.state == EndpointState.READY and r.url]
        if not ready:
            raise ConflictError(f"service {name}: no READY replica to test")
        token = self._token(Path(recs[0].run_dir))
        if token is None:
            raise ConflictError(f"service {name}: its token file cannot be read by this user")
        if not self._bench.acquire(blocking=False):
            raise ConflictError("another performance test is running; try again when it ends")
        try:
            return {"name": name, **run_bench([r.url for r in ready if r.url], token, body)}
        finally:
            self._bench.release()


# ---------------------------------------------------------------------------- routes


def add_routes(app: FastAPI, ctx: "Ctx") -> None:
    """Add the Services pages and their API to ``app``."""
    view = ServicesView(ctx)
    Reader, Writer = ctx.reader, ctx.writer
    Name = Annotated[str, PathParam(pattern=SERVICE, max_length=200)]

    @app.get("/services", include_in_schema=False)
    def services_page(request: Request) -> Response:
        return ctx.page("services.html", request, page_name="services")

    @app.get("/services/{name}", include_in_schema=False)
    def service_page(
        request: Request, name: Annotated[str, PathParam(pattern=SERVICE)]
    ) -> Response:
        return ctx.page("service.html", request, page_name="service", service=name)

    @app.get("/api/services")
    def list_services(
        _: Reader,  # type: ignore[valid-type]
        paging: Paged,
        show: Annotated[str, Query(pattern="^(live|all)$")] = "live",
    ) -> dict[str, Any]:
        """The viewer's services (newest first), filtered by name/model; ``show=all``
        includes stopped ones."""
        return view.page(q=paging.q, show=show, page=paging.page, page_size=paging.page_size)

    @app.post("/api/services")
    def start_service(_: Writer, body: StartBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Start a service (``aimass serve start``)."""
        return view.start(body)

    @app.get("/api/services/{name}")
    def service_detail(_: Reader, name: Name) -> dict[str, Any]:  # type: ignore[valid-type]
        """Replicas with health, version, node, history, latency and throughput; desired vs
        actual replicas; the supervisor's decisions."""
        return view.detail(name)

    @app.post("/api/services/{name}/upgrade")
    def upgrade(_: Writer, name: Name, body: UpgradeBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Blue/green upgrade (to ``version``: the alias is promoted to it first)."""
        return view.upgrade(name, body.version)

    @app.post("/api/services/{name}/rollback")
    def rollback(_: Writer, name: Name) -> dict[str, Any]:  # type: ignore[valid-type]
        """Point the alias back at its previous version and upgrade to it."""
        return view.rollback(name)

    @app.post("/api/services/{name}/stop")
    def stop(_: Writer, name: Name) -> dict[str, Any]:  # type: ignore[valid-type]
        """Drain and stop every replica (and the supervisor)."""
        return view.stop(name)

    @app.post("/api/services/{name}/bench")
    def bench(_: Writer, name: Name, body: BenchBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """A performance test (``aimass bench``): req/s, p50/p95/p99, failed requests."""
        return view.bench(name, body)
