"""The dashboard's FastAPI app: pages, JSON APIs, login and CSRF (see :mod:`.auth`).

``base_url`` (``/node/HOST/PORT/`` behind Open OnDemand) prefixes every link, API call and
the cookie's path. Requests arrive either with that prefix (OnDemand's ``/node/`` proxy keeps
it) or without it (``/rnode/`` strips it); both are served.
"""

# No "from __future__ import annotations": FastAPI resolves the Annotated aliases that
# create_app defines locally only when annotations are real objects.
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from aimass_hpc.common.errors import (
    AimassError,
    ConflictError,
    InputError,
    IntegrityError,
    NotFoundError,
)
from aimass_hpc.config.site import Site
from aimass_hpc.dashboard import cluster, searches, services, training, upload
from aimass_hpc.dashboard.auth import COOKIE, CSRF_HEADER, Auth, Session
from aimass_hpc.dashboard.jobs import STATES, JobsView
from aimass_hpc.dashboard.models import ModelsView
from aimass_hpc.dashboard.paging import Paged, PageNo, PageSize
from aimass_hpc.repo import ModelRepository

HERE = Path(__file__).parent
JOB_ID = r"^[0-9]+(_[0-9]+)?$"
# Model and alias names as the repository accepts them are checked there; this only keeps
# path segments sane.
NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NOT_IN_BASE = "?#;,%\\\"'<>&` \n\r\t\0"
_STATUS = {InputError: 400, NotFoundError: 404, ConflictError: 409, IntegrityError: 409}


def normalize_base_url(base_url: str) -> str:
    """``/node/h/8080`` -> ``/node/h/8080/``; ``""`` -> ``/``. InputError for anything that is
    not a plain absolute path (it goes into every link and the cookie's path)."""
    if (base_url and not base_url.startswith("/")) or any(c in base_url for c in _NOT_IN_BASE):
        raise InputError(f"--base-url: expected a path such as /node/HOST/PORT/ (got {base_url!r})")
    base = "/" + base_url.strip("/")
    return base if base == "/" else base + "/"


class StripBase:
    """ASGI middleware: serve ``BASE/x`` as ``/x`` (OnDemand's /node/ keeps the prefix)."""

    def __init__(self, app: ASGIApp, base: str) -> None:
        self.app = app
        self.prefix = base.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.prefix and scope["type"] == "http":
            path: str = scope["path"]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                scope = {**scope, "path": path[len(self.prefix) :] or "/", "raw_path": None}
        await self.app(scope, receive, send)


class PromoteBody(BaseModel):
    version: int = Field(ge=1)
    alias: str = Field(min_length=1, max_length=128)


class AliasBody(BaseModel):
    alias: str = Field(min_length=1, max_length=128)


class VersionBody(BaseModel):
    version: int = Field(ge=1)


@dataclass(frozen=True)
class Ctx:
    """What a page module's ``add_routes(app, ctx)`` needs to add its pages and APIs.

    ``reader``/``writer`` are FastAPI dependency types (``_: ctx.reader`` as a parameter):
    a logged-in session, and a logged-in session whose request carries the CSRF token.
    ``page(template, request, page_name=..., **context)`` renders a page (or redirects to
    the login). ``jobs`` knows which jobs the viewer may see and act on.
    """

    site: Site
    viewer: str
    base: str
    jobs: JobsView
    repo: ModelRepository
    reader: Any
    writer: Any
    page: Callable[..., Response]


def create_app(
    site: Site,
    *,
    viewer: str,
    admins: Iterable[str] = (),
    base_url: str = "/",
    repo_path: str | Path | None = None,
    auth: Auth | None = None,
) -> FastAPI:
    """The dashboard for ``site`` as ``viewer`` sees it (admins see every user's jobs).

    ``repo_path``: the model repository (default: the site's ``filesystems.models``).
    ``app.state.auth.token`` is the one-time login token.
    """
    base = normalize_base_url(base_url)
    auth = auth or Auth()
    # The site's admins ([dashboard] admins) and those named on the command line.
    jobs = JobsView(site, viewer, [*site.dashboard.admins, *admins])
    repo = ModelRepository(repo_path or site.models_root)
    models = ModelsView(repo)
    templates = Environment(
        loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"])
    )
    app = FastAPI(
        title="aimass dashboard",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, behind the login
    )
    app.state.auth = auth
    app.state.base_url = base

    @app.exception_handler(AimassError)
    async def _aimass_error(request: Request, exc: AimassError) -> JSONResponse:
        code = next((c for t, c in _STATUS.items() if isinstance(exc, t)), 503)
        return JSONResponse({"detail": str(exc)}, status_code=code)

    # ------------------------------------------------------------------ auth

    def session(request: Request) -> Session:
        found = auth.session(request.cookies.get(COOKIE))
        if found is None:
            raise HTTPException(401, "log in first: open the URL with the token aimass printed")
        return found

    def csrf(request: Request, sess: Annotated[Session, Depends(session)]) -> Session:
        if not auth.csrf_ok(sess, request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, f"missing or wrong {CSRF_HEADER} header")
        return sess

    Reader = Annotated[Session, Depends(session)]
    Writer = Annotated[Session, Depends(csrf)]

    def page(name: str, request: Request, **context: Any) -> Response:
        sess = auth.session(request.cookies.get(COOKIE))
        if sess is None:
            return RedirectResponse(base + "login", status_code=303)
        html = templates.get_template(name).render(
            base=base, csrf=sess.csrf, viewer=viewer, states=STATES, **context
        )
        return HTMLResponse(html, headers=_SECURITY_HEADERS)

    def login_page(message: str = "", status: int = 200) -> HTMLResponse:
        html = templates.get_template("login.html").render(base=base, message=message)
        return HTMLResponse(html, status_code=status, headers=_SECURITY_HEADERS)

    def logged_in(token: str) -> Response:
        sess = auth.login(token)
        if sess is None:
            return login_page("That token is wrong or was used already.", 401)
        resp = RedirectResponse(base + "jobs", status_code=303)
        resp.set_cookie(COOKIE, sess.key, path=base, httponly=True, samesite="strict", secure=False)
        return resp

    @app.get("/login", include_in_schema=False)
    def login_get(token: str | None = None) -> Response:
        return logged_in(token) if token else login_page()

    @app.post("/login", include_in_schema=False)
    async def login_post(request: Request) -> Response:
        # The form is urlencoded; parsed here so that no multipart parser is needed.
        raw = (await request.body())[:4096].decode("utf-8", errors="replace")
        return logged_in((parse_qs(raw).get("token") or [""])[0])

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(_: Reader) -> JSONResponse:
        return JSONResponse(app.openapi())

    # ------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse(base + "jobs", status_code=303)

    @app.get("/jobs", include_in_schema=False)
    def jobs_page(request: Request) -> Response:
        return page("jobs.html", request, page_name="jobs")

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(request: Request, job_id: Annotated[str, PathParam(pattern=JOB_ID)]) -> Response:
        return page("job.html", request, page_name="job", job_id=job_id)

    @app.get("/models", include_in_schema=False)
    def models_page(request: Request) -> Response:
        return page("models.html", request, page_name="models")

    @app.get("/models/{name}", include_in_schema=False)
    def model_page(request: Request, name: Annotated[str, PathParam(pattern=NAME)]) -> Response:
        return page("model.html", request, page_name="model", model=name)

    # ------------------------------------------------------------------ jobs API

    JobId = Annotated[str, PathParam(pattern=JOB_ID, max_length=40)]

    @app.get("/api/jobs")
    def list_jobs(
        _: Reader, paging: Paged, state: Annotated[str, Query(max_length=40)] = ""
    ) -> dict[str, Any]:
        """The viewer's jobs, newest first: one page, filtered by name/id and state."""
        return jobs.page(q=paging.q, state=state, page=paging.page, page_size=paging.page_size)

    @app.get("/api/jobs/{job_id}")
    def job_detail(_: Reader, job_id: JobId) -> dict[str, Any]:
        """One job: status, spec, rendered script, log files."""
        return jobs.detail(job_id)

    @app.get("/api/jobs/{job_id}/log")
    def job_log(
        _: Reader,
        job_id: JobId,
        restart: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
        rank: Annotated[int | None, Query(ge=0, le=1_000_000)] = None,
        offset: Annotated[int, Query(ge=0, le=2**53)] = 0,
    ) -> dict[str, Any]:
        """Log text of a restart (default: the latest) from ``offset``; or one rank's lines."""
        return jobs.log(job_id, restart, rank, offset)

    @app.get("/api/jobs/{job_id}/metrics")
    def job_metrics(_: Reader, job_id: JobId) -> dict[str, Any]:
        """The run's training metrics records."""
        return jobs.metrics(job_id)

    @app.post("/api/jobs/{job_id}/cancel")
    def job_cancel(_: Writer, job_id: JobId) -> dict[str, Any]:
        """Cancel the job (it must be the viewer's)."""
        return jobs.cancel(job_id)

    # ------------------------------------------------------------------ models API

    Name = Annotated[str, PathParam(pattern=NAME)]

    @app.get("/api/models")
    def search_models(
        _: Reader,
        name: Annotated[str, Query(max_length=200)] = "*",
        type: Annotated[str, Query(max_length=40)] = "",  # noqa: A002 - the form's field
        flops: Annotated[str, Query(max_length=80)] = "",
        memory: Annotated[str, Query(max_length=80)] = "",
        metric: Annotated[list[str] | None, Query(max_length=20)] = None,
        tag: Annotated[list[str] | None, Query(max_length=20)] = None,
        kind: Annotated[str, Query(pattern="^(|model|checkpoint|sharded)$")] = "",
        page: PageNo = 1,
        page_size: PageSize = 50,
    ) -> dict[str, Any]:
        """Versions matching name (glob), type, FLOPs/memory ranges, metric ranges and tags."""
        return models.search(
            name=name or "*", model_type=type or None, flops=flops or None,
            memory=memory or None, metrics=[m for m in metric or [] if m],
            tags=[t for t in tag or [] if t], kind=kind or None, page=page, page_size=page_size,
        )  # fmt: skip

    @app.get("/api/models/{name}")
    def model_detail(_: Reader, name: Name) -> dict[str, Any]:
        """Every version (with lineage) and alias (with history) of a model."""
        return models.model(name)

    @app.post("/api/models/{name}/promote")
    def promote(_: Writer, name: Name, body: PromoteBody) -> dict[str, Any]:
        """Point an alias at a version."""
        return models.promote(name, body.version, body.alias)

    @app.post("/api/models/{name}/rollback")
    def rollback(_: Writer, name: Name, body: AliasBody) -> dict[str, Any]:
        """Point an alias back at its previous version."""
        return models.rollback(name, body.alias)

    @app.post("/api/models/{name}/verify")
    def verify(_: Writer, name: Name, body: VersionBody) -> dict[str, Any]:
        """Re-hash every tensor of a version."""
        return models.verify(name, body.version)

    @app.delete("/api/models/{name}/versions/{version}")
    def delete(
        _: Writer,
        name: Name,
        version: Annotated[int, PathParam(ge=1, le=2**31)],
        confirm: Annotated[str, Query(max_length=300)] = "",
        force: bool = False,
    ) -> dict[str, Any]:
        """Delete a version; ``confirm`` must repeat ``NAME:VERSION``."""
        return models.delete(name, version, confirm, force)

    # ------------------------------------------------------------------ other pages

    ctx = Ctx(site, viewer, base, jobs, repo, Reader, Writer, page)
    for module in (training, searches, services, cluster, upload):
        module.add_routes(app, ctx)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.add_middleware(StripBase, base=base)
    return app


_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", proxy_headers=False)
