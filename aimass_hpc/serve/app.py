"""The HTTP API of one replica (FastAPI; served by uvicorn, see :mod:`aimass_hpc.serve.server`).

Routes::

    POST /v1/predict   JSON {"inputs": [[...]], "dtype"?} or a binary .npy body
                       (Content-Type: application/x-npy); answers in kind, or as the
                       Accept header asks. Bearer token required.
    GET  /v1/models    what is served: name, version, input/output shape, limits.
    GET  /healthz      alive (no token: a probe must not need secrets).
    GET  /readyz       200 when the model is loaded and warmed up, 503 while loading/draining.
    GET  /metrics      Prometheus text format. Bearer token required.
    GET  /openapi.json the schema. Bearer token required.

There is no ``/docs`` or ``/redoc`` page (see :func:`create_app` for why).

The predict body is read and decoded by hand (not by pydantic) so that a large tensor is
parsed once, by numpy, and the body-size limit is enforced while reading. The OpenAPI schema
still describes it, through ``openapi_extra``.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from aimass_hpc import __version__
from aimass_hpc.serve.auth import bearer_token, token_matches
from aimass_hpc.serve.batching import BatcherStopped, DynamicBatcher, QueueFull
from aimass_hpc.serve.codec import (
    ALLOWED_DTYPES,
    JSON_MEDIA_TYPE,
    NPY_MEDIA_TYPE,
    NPY_MEDIA_TYPES,
    BadInput,
    check_batch,
    decode_json,
    decode_npy,
    encode_json,
    encode_npy,
    json_schema_for,
    media_type_of,
    wants_npy,
)
from aimass_hpc.serve.defaults import DEFAULTS
from aimass_hpc.serve.metrics import MetricsMiddleware, ServeMetrics
from aimass_hpc.serve.model_loader import ServedModel
from aimass_hpc.serve.model_process import ModelProcessError, reason_of

log = logging.getLogger(__name__)

ROUTES = frozenset(
    {"/v1/predict", "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json"}
)


class Phase(StrEnum):
    """What the replica can do right now."""

    LOADING = "LOADING"  # listening, model not loaded: predict 503
    WARMING = "WARMING"  # model loaded, warm-up request in flight: predict ok, readyz 503
    READY = "READY"
    DRAINING = "DRAINING"  # still answers, but tells probes and clients to go elsewhere
    FAILED = "FAILED"


@dataclass
class ServeConfig:
    """Limits and batching knobs of one replica."""

    max_batch_size: int = DEFAULTS.max_batch_size  # rows per forward, and per request
    max_wait_ms: float = DEFAULTS.max_wait_ms
    batching: bool = DEFAULTS.batching
    max_body_bytes: int = DEFAULTS.max_body_bytes
    max_queue: int = DEFAULTS.max_queue


@dataclass
class ServiceState:
    """Mutable state shared by the routes and the replica runner."""

    config: ServeConfig = field(default_factory=ServeConfig)
    phase: Phase = Phase.LOADING
    model: ServedModel | None = None
    batcher: DynamicBatcher | None = None
    message: str | None = None

    def attach(self, model: ServedModel, batcher: DynamicBatcher) -> None:
        """Model loaded: requests may flow (readiness still waits for the warm-up)."""
        self.model = model
        self.batcher = batcher
        self.phase = Phase.WARMING


# --- schema-only models (the OpenAPI document; bodies are parsed by codec) -------------------
class PredictRequest(BaseModel):
    """JSON predict body. ``inputs`` has shape [N, *input_shape] (see GET /v1/models)."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] = Field(description="nested lists of numbers, batch axis first")
    dtype: Literal[tuple(sorted(ALLOWED_DTYPES))] | None = Field(  # type: ignore[valid-type]
        default=None, description="dtype of the values (default: inferred, then cast)"
    )


class PredictResponse(BaseModel):
    """JSON predict answer."""

    outputs: list[Any]
    shape: list[int]
    dtype: str
    model: str
    version: str | None


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: one line saying what is wrong."""

    detail: str


class ModelInfo(BaseModel):
    name: str
    ref: str
    version: str | None
    device: str
    input_shape: list[int]
    input_dtype: str
    output_shape: list[int] | None
    parameters: int
    max_batch_size: int
    max_wait_ms: float
    batching: bool
    max_body_bytes: int


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    phase: str
    model: str | None = None
    version: str | None = None
    message: str | None = None


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "malformed body",
        401: "missing or wrong bearer token",
        413: "body or batch too large",
        415: "unsupported content type",
        422: "inputs do not fit the model (shape, dtype, values)",
        503: "not ready, draining or overloaded; retry on another replica",
    }.items()
}

_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            JSON_MEDIA_TYPE: {"schema": PredictRequest.model_json_schema()},
            NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _error(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


@dataclass
class Answer:
    """A complete HTTP answer (the predict path builds these without a framework)."""

    status: int
    body: bytes
    media_type: str = JSON_MEDIA_TYPE
    headers: dict[str, str] = field(default_factory=dict)


def _error_answer(status: int, detail: str, headers: dict[str, str] | None = None) -> Answer:
    return Answer(status, json.dumps({"detail": detail}).encode(), JSON_MEDIA_TYPE, headers or {})


BodyReader = Callable[[int], Awaitable[bytes]]


async def answer_predict(
    state: ServiceState, token: str, header: Callable[[str], str | None], read_body: BodyReader
) -> Answer:
    """Everything ``POST /v1/predict`` does: auth, limits, decoding, batching, encoding.

    ``header(name)`` looks up a lower-case request header; ``read_body(limit)`` returns the
    body or raises :class:`BadInput` (413) past ``limit`` bytes. Never raises.
    """
    if not token_matches(bearer_token(header("authorization")), token):
        return _error_answer(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
    model, batcher = state.model, state.batcher
    if model is None or batcher is None or state.phase in (Phase.LOADING, Phase.FAILED):
        return _error_answer(503, f"model not loaded ({state.phase})", {"Retry-After": "1"})
    media = media_type_of(header("content-type"))
    if media != JSON_MEDIA_TYPE and media not in NPY_MEDIA_TYPES:
        return _error_answer(
            415, f"Content-Type {media!r}: use {JSON_MEDIA_TYPE} or {NPY_MEDIA_TYPE}"
        )
    try:
        declared = header("content-length")
        limit = state.config.max_body_bytes
        if declared is not None:
            if not (declared.isascii() and declared.isdigit()):
                raise BadInput("Content-Length is not a number", 400)
            if int(declared) > limit:
                raise BadInput(f"body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        body = await read_body(limit)
        arr = decode_npy(body) if media in NPY_MEDIA_TYPES else decode_json(body)
        arr = check_batch(arr, model.spec, state.config.max_batch_size)
    except BadInput as exc:
        return _error_answer(exc.status, str(exc))
    try:
        out = await batcher.submit(arr)
    except (QueueFull, BatcherStopped, ModelProcessError) as exc:
        return _error_answer(503, f"cannot take the request now: {exc}", {"Retry-After": "1"})
    except Exception as exc:
        reason = reason_of(exc).splitlines()[0][:300]
        if model.spec.shape is None:  # nothing was checked up front: the model's word stands
            return _error_answer(422, f"the model rejected the inputs: {reason}")
        return _error_answer(500, f"forward failed: {reason}")
    headers = {"X-Aimass-Model": model.name, "X-Aimass-Version": str(model.version)}
    if wants_npy(header("accept"), media):
        return Answer(200, encode_npy(out), NPY_MEDIA_TYPE, headers)
    payload = encode_json(out, {"model": model.name, "version": model.version})
    return Answer(200, payload, JSON_MEDIA_TYPE, headers)


class PredictFastPath:
    """Pure ASGI handling of ``POST /v1/predict`` (everything else goes to FastAPI).

    The FastAPI route documents the operation and behaves the same (it calls the same
    :func:`answer_predict`), but routing, dependency injection and request objects cost
    several hundred microseconds per request: as much as the forward of a small model.
    """

    def __init__(self, app: Any, state: ServiceState, token: str) -> None:
        self.app = app
        self.state = state
        self.token = token

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/v1/predict" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin1").lower(): v.decode("latin1") for k, v in scope["headers"]}

        async def read_body(limit: int) -> bytes:
            chunks: list[bytes] = []
            total, more = 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise BadInput("client disconnected", 400)
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > limit:
                    raise BadInput(f"body exceeds the limit of {limit} bytes", 413)
                chunks.append(chunk)
                more = message.get("more_body", False)
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        try:
            ans = await answer_predict(self.state, self.token, headers.get, read_body)
        except Exception as exc:  # a bug: answer, log, stay up
            log.exception("predict failed")
            ans = _error_answer(500, f"internal error: {type(exc).__name__}")
        raw = [
            (b"content-type", ans.media_type.encode()),
            (b"content-length", str(len(ans.body)).encode()),
        ]
        raw += [(k.lower().encode(), v.encode("latin1", "replace")) for k, v in ans.headers.items()]
        await send({"type": "http.response.start", "status": ans.status, "headers": raw})
        await send({"type": "http.response.body", "body": ans.body})


class ServeApp(FastAPI):
    """FastAPI with the metrics and the predict fast path in front of its middleware stack.

    Added with ``add_middleware`` they would sit inside Starlette's error, body-limit and
    telemetry middleware, which a profile under load showed costing more per predict request
    than everything the fast path itself does. Here a request meets
    ``MetricsMiddleware -> PredictFastPath`` first, and only the other routes go on into
    FastAPI (with all of its middleware, as before).
    """

    _entry: Any = None

    def set_entry(self, entry: Any) -> None:
        """The outermost ASGI callable (built around :meth:`framework`)."""
        self._entry = entry

    async def framework(self, scope: dict, receive: Any, send: Any) -> None:
        """FastAPI's own ASGI entry: routing, dependencies, its middleware stack."""
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:  # type: ignore[override]
        entry = self._entry
        if entry is None:
            await super().__call__(scope, receive, send)
        else:
            await entry(scope, receive, send)


def create_app(state: ServiceState, token: str, metrics: ServeMetrics | None = None) -> FastAPI:
    """The FastAPI app of one replica; ``token`` guards everything but the health probes.

    The schema follows the API's auth: it names the exact input shape of the model and the
    routes, which is what ``GET /v1/models`` tells only token holders, so ``/openapi.json``
    needs the token as well. The Swagger UI (``/docs``) and ReDoc (``/redoc``) pages are off:
    a browser opening them cannot send a bearer header, so behind the token they could only
    show a 401, and without it they would publish the schema to anyone who can reach the
    node. Users who want the interactive page fetch the schema with the token
    (``curl -H "Authorization: Bearer $(cat serve.token)" .../openapi.json``) and load it
    into any OpenAPI viewer.
    """
    metrics = metrics or ServeMetrics(ROUTES)
    app = ServeApp(
        title="aimass model service",
        version=__version__,
        description="Predictions from a model of the aimass repository, served on a cluster.",
        openapi_url=None,  # served below, behind the token
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = state
    app.state.metrics = metrics
    bearer = HTTPBearer(
        auto_error=False, description="the token in <run_dir>/serve.token (mode 0600)"
    )

    def require_token(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        presented = creds.credentials if creds is not None else None
        if not token_matches(presented, token):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    @app.exception_handler(BadInput)
    async def _bad_input(_: Request, exc: BadInput) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.post(
        "/v1/predict",
        dependencies=[Depends(bearer)],  # documents the scheme; answer_predict checks it
        response_model=PredictResponse,
        responses={
            200: {"content": {NPY_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
            **_ERRORS,
        },
        openapi_extra=_PREDICT_BODY,
        summary="Run the model on a batch",
    )
    async def predict(request: Request) -> Response:
        async def read_body(limit: int) -> bytes:
            chunks, total = [], 0
            async for chunk in request.stream():
                total += len(chunk)
                if total > limit:
                    raise BadInput(f"body exceeds the limit of {limit} bytes", 413)
                chunks.append(chunk)
            return b"".join(chunks)

        ans = await answer_predict(state, token, request.headers.get, read_body)
        return Response(ans.body, ans.status, ans.headers, media_type=ans.media_type)

    @app.get(
        "/v1/models",
        dependencies=[Depends(require_token)],
        response_model=ModelsResponse,
        responses={401: _ERRORS[401]},
        summary="What this replica serves",
    )
    async def models() -> dict[str, Any]:
        if state.model is None:
            return {"models": []}
        cfg = state.config
        info = state.model.describe() | {
            "max_batch_size": cfg.max_batch_size,
            "max_wait_ms": cfg.max_wait_ms,
            "batching": cfg.batching,
            "max_body_bytes": cfg.max_body_bytes,
        }
        return {"models": [info]}

    @app.get("/healthz", response_model=Health, summary="Alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "not ready"}},
        summary="Ready for predictions",
    )
    async def readyz() -> JSONResponse:
        model = state.model
        body = Readiness(
            ready=state.phase == Phase.READY,
            phase=str(state.phase),
            model=model.name if model else None,
            version=model.version if model else None,
            message=state.message,
        ).model_dump()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get(
        "/metrics",
        dependencies=[Depends(require_token)],
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
            401: _ERRORS[401],
        },
        summary="Prometheus metrics",
    )
    async def prometheus_metrics() -> Response:
        metrics.queue_depth.set(state.batcher.pending if state.batcher else 0)
        metrics.ready.set(1 if state.phase == Phase.READY else 0)
        return Response(metrics.render(), media_type=metrics.content_type)

    generic_openapi = app.openapi
    schema_model: list[ServedModel | None] = [None]

    def model_openapi() -> dict[str, Any]:
        # Once a model is loaded, the schema describes its exact input shape (and fuzzers
        # generated from it reach the model instead of stopping at validation).
        if app.openapi_schema is not None and schema_model[0] is state.model:
            return app.openapi_schema
        app.openapi_schema = None
        doc = copy.deepcopy(generic_openapi())
        if state.model is not None:
            content = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
            body = content[JSON_MEDIA_TYPE]["schema"]
            body["properties"]["inputs"] = json_schema_for(
                state.model.spec, state.config.max_batch_size
            ) | {"description": f"batch of shape {state.model.spec.describe()}"}
        schema_model[0] = state.model
        app.openapi_schema = doc
        return doc

    app.openapi = model_openapi  # type: ignore[method-assign]

    @app.get("/openapi.json", dependencies=[Depends(require_token)], include_in_schema=False)
    async def openapi_schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    # Metrics outermost (they see every answer), then the predict fast path, then FastAPI.
    app.set_entry(MetricsMiddleware(PredictFastPath(app.framework, state, token), metrics))
    return app
