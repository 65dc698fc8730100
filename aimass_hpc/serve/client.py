"""Client helper: find a service's live replicas, spread requests, survive replica changes.

::

    from aimass_hpc.serve import Client
    with Client("mnist@prod", runs_root="/scratch/me/aimass-runs") as c:
        y = c.predict(x)               # numpy in, numpy out

A target is a model ref (``NAME``, ``NAME:VERSION``, ``NAME@ALIAS``), resolved through the
endpoint records under the runs root (each replica's token is read from its run directory), or
one or more base URLs (``"http://h:p,http://h2:p2"``, with ``token=`` or $AIMASS_SERVE_TOKEN).
The runs root is ``runs_root=``, else the ``filesystems.runs`` of ``site=`` (a site name or
path, as ``--site`` takes), else ``$AIMASS_RUNS_ROOT``, else that of ``$AIMASS_SITE`` -- the
site every ``aimass`` command uses when none is given.

A batch larger than the replicas take in one request (their ``max_batch_size``, which the
client reads once from ``GET /v1/models``) is split into requests of at most that many rows,
and the outputs are joined in input order; a replica that still refuses a part with a smaller
limit (a 413 naming it: another version mid-upgrade) makes the client split to that one.

Requests go round robin over the replicas whose record says READY and whose ``/readyz``
answered. A connection error or a 5xx moves the same request to the next replica (predictions
are pure functions of their input, so a retry is always safe); when every replica failed the
client re-reads the records -- a blue/green switch or a handover has usually started new ones
-- and keeps trying until ``retry_timeout`` runs out. A 4xx is the caller's mistake and is
raised at once with the server's message.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from aimass_hpc.common.errors import InputError, NotFoundError, SchedulerError
from aimass_hpc.repo.refs import Ref
from aimass_hpc.serve.auth import TOKEN_ENV, read_token
from aimass_hpc.serve.codec import JSON_MEDIA_TYPE, NPY_MEDIA_TYPE, decode_npy, encode_npy
from aimass_hpc.serve.endpoints import FINAL_STATES, EndpointRecord, EndpointState, find_records

RUNS_ROOT_ENV = "AIMASS_RUNS_ROOT"
SITE_ENV = "AIMASS_SITE"  # the same variable config.site reads (imported lazily: pydantic)
PROBE_TIMEOUT_S = 2.0
# The server's words for a batch over its limit (serve/codec.py ``check_batch``, a 413).
_ROWS_LIMIT = re.compile(r"samples in one request, the limit is (?P<limit>[0-9]+)", re.ASCII)


class RequestRejected(InputError):
    """The service refused the request (4xx): bad input, bad token. ``status`` is the code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServiceUnavailable(SchedulerError):
    """No replica answered within the retry timeout."""


@dataclass(frozen=True)
class Endpoint:
    """One replica as the client sees it."""

    url: str
    token: str | None
    record: EndpointRecord | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass
class Prediction:
    """Outputs plus which model version and replica produced them."""

    outputs: np.ndarray
    model: str | None
    version: str | None
    endpoint: str


def _as_array(inputs: Any) -> np.ndarray:
    if hasattr(inputs, "detach"):  # a torch tensor, without importing torch here
        inputs = inputs.detach().cpu().numpy()
    return np.asarray(inputs)


def encode_request(
    inputs: Any, *, binary: bool | None = None, threshold: int = 64 * 1024
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for ``POST /v1/predict``: .npy for large arrays, JSON otherwise."""
    arr = _as_array(inputs)
    if binary is None:
        binary = arr.nbytes >= threshold
    if binary:
        return encode_npy(arr), {"Content-Type": NPY_MEDIA_TYPE, "Accept": NPY_MEDIA_TYPE}
    doc = {"inputs": arr.tolist(), "dtype": arr.dtype.name}
    body = json.dumps(doc, separators=(",", ":")).encode()
    return body, {"Content-Type": JSON_MEDIA_TYPE, "Accept": JSON_MEDIA_TYPE}


def decode_response(resp: httpx.Response, endpoint: str) -> Prediction:
    """A predict answer (either format) as a :class:`Prediction`."""
    ctype = resp.headers.get("content-type", "")
    if ctype.startswith(NPY_MEDIA_TYPE):
        outputs = decode_npy(resp.content).copy()
        model = resp.headers.get("x-aimass-model")
        version = resp.headers.get("x-aimass-version")
    else:
        doc = resp.json()
        outputs = np.asarray(doc["outputs"], dtype=doc.get("dtype", "float32"))
        model, version = doc.get("model"), doc.get("version")
    if version == "None":
        version = None
    return Prediction(outputs, model, version, endpoint)


def resolve_runs_root(
    runs_root: str | os.PathLike[str] | None, site: str | None = None
) -> Path | None:
    """Where endpoint records are looked for: ``runs_root``, else the runs root of ``site``,
    else ``$AIMASS_RUNS_ROOT``, else that of ``$AIMASS_SITE``; None when nothing says."""
    if runs_root is not None:
        return Path(runs_root)
    if site is None and os.environ.get(RUNS_ROOT_ENV):
        return Path(os.environ[RUNS_ROOT_ENV])
    if site is not None or os.environ.get(SITE_ENV):
        from aimass_hpc.config.site import load_site

        return load_site(site).runs_root  # load_site(None) reads $AIMASS_SITE
    return None


def _chunks(arr: np.ndarray, rows: int | None) -> list[np.ndarray]:
    """``arr`` split along the batch axis into parts of at most ``rows`` rows (in order)."""
    if rows is None or arr.ndim == 0 or arr.shape[0] <= rows:
        return [arr]
    return [arr[i : i + rows] for i in range(0, arr.shape[0], rows)]


def _rows(arr: np.ndarray) -> int:
    """Rows along the batch axis (1 for a scalar, which the server refuses anyway)."""
    return int(arr.shape[0]) if arr.ndim else 1


def _smaller_limit(exc: RequestRejected, rows: int) -> int | None:
    """The row limit a 413 names, when it is below the ``rows`` that were sent."""
    match = _ROWS_LIMIT.search(str(exc)) if exc.status == 413 else None
    if match is None:
        return None
    limit = int(match.group("limit"))
    return limit if 0 < limit < rows else None


def _joined(parts: list[Prediction]) -> Prediction:
    """One prediction from the parts' outputs in order (model and version of the first)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    outputs = np.concatenate([p.outputs for p in parts], axis=0)
    return Prediction(outputs, first.model, first.version, parts[-1].endpoint)


def _row_limit(models: list[dict[str, Any]]) -> int | None:
    """The smallest ``max_batch_size`` a ``/v1/models`` answer names, None if none does."""
    limits = [m.get("max_batch_size") for m in models if isinstance(m, dict)]
    ints = [v for v in limits if isinstance(v, int) and not isinstance(v, bool) and v > 0]
    return min(ints) if ints else None


def _detail(resp: httpx.Response) -> str:
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    return str(detail) if detail else resp.text[:200]


class _Pool:
    """The live replicas of a target, in round-robin order. Thread-safe."""

    def __init__(
        self,
        target: str,
        runs_root: str | os.PathLike[str] | None,
        token: str | None,
        site: str | None = None,
    ) -> None:
        self.target = target
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.static = target.startswith(("http://", "https://"))
        root = None
        if not self.static:
            Ref.parse(target, "target")  # a bad reference fails here, in one line
            root = resolve_runs_root(runs_root, site)
            if root is None:
                raise InputError(
                    f"cannot resolve {target!r}: give runs_root= or site=, or set "
                    f"${RUNS_ROOT_ENV} or ${SITE_ENV}"
                )
        self.runs_root = root
        self.live: list[Endpoint] = []
        self.bad: set[str] = set()
        self.refreshed = 0.0
        self._rr = itertools.count()
        self._lock = threading.Lock()

    def discover(self) -> list[Endpoint]:
        """Endpoints named by the target: the URLs, or the READY records."""
        if self.static:
            urls = [u.strip().rstrip("/") for u in self.target.split(",") if u.strip()]
            return [Endpoint(u, self.token) for u in urls]
        assert self.runs_root is not None
        records = find_records(self.runs_root, self.target)
        if not records:
            raise NotFoundError(f"no service for {self.target!r} under {self.runs_root}")
        if all(EndpointState(r.state) in FINAL_STATES for r in records):
            raise NotFoundError(
                f"every replica of {self.target!r} under {self.runs_root} has stopped or failed"
            )
        out = []
        for rec in records:
            if rec.state != EndpointState.READY or rec.url is None:
                continue
            token = self.token
            if token is None and rec.token_file:
                try:
                    token = read_token(rec.token_file)
                except (NotFoundError, InputError):
                    continue  # not ours to use
            out.append(Endpoint(rec.url, token, rec))
        return out

    def needs_probe(self, found: list[Endpoint]) -> list[Endpoint]:
        """Newly found (or previously failed) endpoints that must pass /readyz first."""
        if self.static:
            return []
        known = {e.url for e in self.live} - self.bad
        return [e for e in found if e.url not in known]

    def update(self, found: list[Endpoint], probed_ok: Iterable[str]) -> None:
        ok = set(probed_ok)
        with self._lock:
            known = {e.url for e in self.live} - self.bad
            self.live = [e for e in found if e.url in known or e.url in ok or self.static]
            self.bad = set()
            self.refreshed = time.monotonic()

    def rotation(self) -> list[Endpoint]:
        """Live endpoints starting at the next round-robin position, failed ones skipped."""
        with self._lock:
            eps = [e for e in self.live if e.url not in self.bad]
            if not eps:
                return []
            start = next(self._rr) % len(eps)
            return eps[start:] + eps[:start]

    def mark_bad(self, ep: Endpoint) -> None:
        with self._lock:
            self.bad.add(ep.url)


class _Base:
    def __init__(
        self,
        target: str,
        *,
        runs_root: str | os.PathLike[str] | None = None,
        token: str | None = None,
        timeout: float = 60.0,
        retry_timeout: float = 30.0,
        refresh_interval: float = 2.0,
        binary_threshold: int = 64 * 1024,
        site: str | None = None,
    ) -> None:
        self.target = target
        self._pool = _Pool(target, runs_root, token, site)
        self.max_rows: int | None = None  # rows per request, once the replicas said (split)
        self._limit_known = False
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.refresh_interval = refresh_interval
        self.binary_threshold = binary_threshold
        self.last_endpoint: str | None = None
        self.retries = 0  # requests moved to another replica (observability, tests)

    def _due(self) -> bool:
        return time.monotonic() - self._pool.refreshed >= self.refresh_interval

    # -- for other transports over the same pool (serve/llm.py: OpenAI clients) -------------
    def refresh_due(self) -> bool:
        """True when the records were read more than ``refresh_interval`` seconds ago."""
        return self._due()

    def rotation(self) -> list[Endpoint]:
        """The live replicas from the next round-robin position, failed ones skipped."""
        return self._pool.rotation()

    def mark_failed(self, ep: Endpoint) -> None:
        """Skip ``ep`` until the next refresh: a request to it failed (counted in retries)."""
        self._pool.mark_bad(ep)
        self.retries += 1

    def _unavailable(self, last_error: str | None) -> ServiceUnavailable:
        return ServiceUnavailable(
            f"no replica of {self.target!r} answered within {self.retry_timeout:g}s"
            + (f" (last error: {last_error})" if last_error else "")
        )


class Client(_Base):
    """Synchronous client (see the module docstring). Use as a context manager or close()."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self._http = httpx.Client(timeout=self.timeout, trust_env=False)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close connections."""
        self._http.close()

    def refresh(self) -> list[Endpoint]:
        """Re-read the endpoint records and probe new replicas; returns the live ones."""
        found = self._pool.discover()
        ok = []
        for ep in self._pool.needs_probe(found):
            try:
                r = self._http.get(f"{ep.url}/readyz", timeout=PROBE_TIMEOUT_S)
                if r.status_code == 200:
                    ok.append(ep.url)
            except httpx.HTTPError:
                pass
        self._pool.update(found, ok)
        return list(self._pool.live)

    def endpoints(self) -> list[Endpoint]:
        """The live replicas (refreshing first)."""
        return self.refresh()

    def _request(self, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, Endpoint]:
        deadline = time.monotonic() + self.retry_timeout
        backoff = 0.05
        last_error: str | None = None
        extra = kwargs.pop("headers", {})
        if self._due():
            self.refresh()
        while True:
            for ep in self._pool.rotation():
                try:
                    resp = self._http.request(
                        method, ep.url + path, headers={**ep.headers, **extra}, **kwargs
                    )
                except httpx.TransportError as exc:
                    last_error = f"{ep.url}: {type(exc).__name__}: {exc}"
                else:
                    if resp.status_code < 500:
                        if resp.status_code >= 400:
                            raise RequestRejected(
                                f"{ep.url}{path} answered {resp.status_code}: {_detail(resp)}",
                                resp.status_code,
                            )
                        self.last_endpoint = ep.url
                        return resp, ep
                    last_error = f"{ep.url}: HTTP {resp.status_code}: {_detail(resp)}"
                self._pool.mark_bad(ep)
                self.retries += 1
            if time.monotonic() >= deadline:
                raise self._unavailable(last_error)
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            self.refresh()

    def predict_full(self, inputs: Any, *, binary: bool | None = None) -> Prediction:
        """Predict and say which version and replica answered.

        A batch over the replicas' row limit goes as several requests, joined in order.
        """
        arr = _as_array(inputs)
        if not self._limit_known:
            self._limit_known = True
            self.max_rows = _row_limit(self.models())
        parts: list[Prediction] = []
        pending = _chunks(arr, self.max_rows)
        while pending:
            part = pending.pop(0)
            try:
                parts.append(self._predict_one(part, binary))
            except RequestRejected as exc:
                limit = _smaller_limit(exc, _rows(part))
                if limit is None:
                    raise
                self.max_rows = limit
                pending[:0] = _chunks(part, limit)
        return _joined(parts)

    def _predict_one(self, arr: np.ndarray, binary: bool | None) -> Prediction:
        body, headers = encode_request(arr, binary=binary, threshold=self.binary_threshold)
        resp, ep = self._request("POST", "/v1/predict", content=body, headers=headers)
        return decode_response(resp, ep.url)

    def predict(self, inputs: Any, *, binary: bool | None = None) -> np.ndarray:
        """Outputs for a batch ``inputs`` of shape [N, *input_shape] (numpy or torch)."""
        return self.predict_full(inputs, binary=binary).outputs

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` of one replica."""
        resp, _ = self._request("GET", "/v1/models")
        return list(resp.json()["models"])


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client` (same arguments, awaitable methods)."""

    def __init__(self, target: str, *, max_connections: int = 100, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._http = httpx.AsyncClient(timeout=self.timeout, trust_env=False, limits=limits)
        self._refreshing: asyncio.Lock | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close connections."""
        await self._http.aclose()

    async def refresh(self) -> list[Endpoint]:
        """Re-read the endpoint records and probe new replicas; returns the live ones."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        async with self._refreshing:
            found = self._pool.discover()
            probes = self._pool.needs_probe(found)

            async def probe(ep: Endpoint) -> str | None:
                try:
                    r = await self._http.get(f"{ep.url}/readyz", timeout=PROBE_TIMEOUT_S)
                    return ep.url if r.status_code == 200 else None
                except httpx.HTTPError:
                    return None

            ok = await asyncio.gather(*(probe(ep) for ep in probes))
            self._pool.update(found, [u for u in ok if u])
            return list(self._pool.live)

    async def _request(
        self, method: str, path: str, **kwargs: Any
    ) -> tuple[httpx.Response, Endpoint]:
        deadline = time.monotonic() + self.retry_timeout
        backoff = 0.05
        last_error: str | None = None
        extra = kwargs.pop("headers", {})
        if self._due():
            await self.refresh()
        while True:
            for ep in self._pool.rotation():
                try:
                    resp = await self._http.request(
                        method, ep.url + path, headers={**ep.headers, **extra}, **kwargs
                    )
                except httpx.TransportError as exc:
                    last_error = f"{ep.url}: {type(exc).__name__}: {exc}"
                else:
                    if resp.status_code < 500:
                        if resp.status_code >= 400:
                            raise RequestRejected(
                                f"{ep.url}{path} answered {resp.status_code}: {_detail(resp)}",
                                resp.status_code,
                            )
                        self.last_endpoint = ep.url
                        return resp, ep
                    last_error = f"{ep.url}: HTTP {resp.status_code}: {_detail(resp)}"
                self._pool.mark_bad(ep)
                self.retries += 1
            if time.monotonic() >= deadline:
                raise self._unavailable(last_error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            await self.refresh()

    async def predict_full(self, inputs: Any, *, binary: bool | None = None) -> Prediction:
        """Predict and say which version and replica answered.

        A batch over the replicas' row limit goes as several concurrent requests, joined in
        order.
        """
        arr = _as_array(inputs)
        if not self._limit_known:
            self._limit_known = True
            self.max_rows = _row_limit(await self.models())
        parts = await asyncio.gather(
            *(self._predict_part(part, binary) for part in _chunks(arr, self.max_rows))
        )
        return _joined(list(parts))

    async def _predict_part(self, arr: np.ndarray, binary: bool | None) -> Prediction:
        """One part; split again when a replica names a smaller row limit (a 413)."""
        try:
            return await self._predict_one(arr, binary)
        except RequestRejected as exc:
            limit = _smaller_limit(exc, _rows(arr))
            if limit is None:
                raise
            self.max_rows = limit
            parts = [await self._predict_one(part, binary) for part in _chunks(arr, limit)]
            return _joined(parts)

    async def _predict_one(self, arr: np.ndarray, binary: bool | None) -> Prediction:
        body, headers = encode_request(arr, binary=binary, threshold=self.binary_threshold)
        resp, ep = await self._request("POST", "/v1/predict", content=body, headers=headers)
        return decode_response(resp, ep.url)

    async def predict(self, inputs: Any, *, binary: bool | None = None) -> np.ndarray:
        """Outputs for a batch ``inputs`` of shape [N, *input_shape]."""
        return (await self.predict_full(inputs, binary=binary)).outputs

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models`` of one replica."""
        resp, _ = await self._request("GET", "/v1/models")
        return list(resp.json()["models"])
