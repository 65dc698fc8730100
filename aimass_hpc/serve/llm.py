"""OpenAI clients for LLM services (``aimass serve start NAME --engine vllm``), with failover.

Each replica of an LLM service runs vLLM's OpenAI-compatible server, so the official
``openai`` client talks to one replica as is (``base_url=<record url>/v1``, ``api_key=`` the
service token). :func:`openai_client` gives one that talks to the *service*::

    from aimass_hpc.serve.llm import openai_client
    client = openai_client("tiny@prod", site="dev")          # an ordinary openai.OpenAI
    client.completions.create(model="tiny", prompt="Hello", max_tokens=8)
    for chunk in client.chat.completions.create(model="tiny", stream=True, messages=[...]):
        ...

Its httpx transport picks a replica from the endpoint records exactly as
:class:`aimass_hpc.serve.client.Client` does (READY records whose ``/readyz`` answered, round
robin, records re-read every ``refresh_interval`` seconds, each replica's token read from its
run directory) and sends that replica's token. A connection error, a dropped connection or a
502/503/504 (a draining or stopping replica) moves the request to the next replica before any
byte of the answer reaches the caller; when every replica failed the records are re-read (a
blue/green switch or a time-limit handover has started new ones) until ``retry_timeout``.
A stream that already started is not restarted. Every answer carries the headers
``x-aimass-endpoint`` and ``x-aimass-version`` (the replica and the model version from its
record; ``client.completions.with_raw_response.create(...)`` shows them).
``async_openai_client`` is the asyncio twin.

Without aimass installed a user points the client at one replica by hand: ``aimass endpoints
NAME --json`` gives its ``url``, and the token is the file ``token_file`` names.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import TYPE_CHECKING, Any

import httpx

from aimass_hpc.serve.client import AsyncClient, Client, Endpoint

if TYPE_CHECKING:
    import openai

# The host the openai client is given; the transport replaces it with a replica's address.
SERVICE_BASE_URL = "http://aimass-service/v1"
RETRY_STATUSES = frozenset({502, 503, 504})
# Failures before any answer byte: the request can go to another replica unchanged.
RETRY_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.RemoteProtocolError,
    httpx.ReadError,
    httpx.WriteError,
)
PROBE_TIMEOUT_S = 10.0
ENDPOINT_HEADER = "x-aimass-endpoint"
VERSION_HEADER = "x-aimass-version"


def retarget(request: httpx.Request, ep: Endpoint) -> httpx.Request:
    """``request`` sent to replica ``ep`` instead, with ``ep``'s token."""
    base = httpx.URL(ep.url)
    url = request.url.copy_with(scheme=base.scheme, host=base.host, port=base.port)
    headers = request.headers.copy()
    headers["Host"] = url.netloc.decode("ascii")
    headers.update(ep.headers)
    return httpx.Request(
        request.method, url, headers=headers, content=request.content,
        extensions=request.extensions,
    )  # fmt: skip


def _failed(ep: Endpoint, what: str) -> str:
    return f"{ep.url}: {what}"


def _answered(pool: Client | AsyncClient, resp: httpx.Response, ep: Endpoint) -> httpx.Response:
    """``resp`` marked with the replica and model version that answered (as the built-in
    server's headers; ``client.completions.with_raw_response`` shows them)."""
    pool.last_endpoint = ep.url
    resp.headers[ENDPOINT_HEADER] = ep.url
    if ep.record is not None and ep.record.version is not None:
        resp.headers[VERSION_HEADER] = str(ep.record.version)
    return resp


def _unavailable(pool: Client | AsyncClient, last_error: str) -> str:
    return (
        f"no replica of {pool.target!r} answered within {pool.retry_timeout:g}s "
        f"(last error: {last_error})"
    )


class FailoverTransport(httpx.BaseTransport):
    """Sends each request to a live replica of ``pool``'s target, the next one on failure."""

    def __init__(self, pool: Client, inner: httpx.BaseTransport | None = None) -> None:
        self.pool = pool
        self.inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body is kept, so it can be sent again
        deadline = time.monotonic() + self.pool.retry_timeout
        backoff, last_error = 0.05, "no READY replica"
        if self.pool.refresh_due():
            self.pool.refresh()
        while True:
            for ep in self.pool.rotation():
                try:
                    resp = self.inner.handle_request(retarget(request, ep))
                except RETRY_ERRORS as exc:
                    last_error = _failed(ep, f"{type(exc).__name__}: {exc}")
                else:
                    if resp.status_code not in RETRY_STATUSES:
                        return _answered(self.pool, resp, ep)
                    resp.read()
                    resp.close()
                    last_error = _failed(ep, f"HTTP {resp.status_code}")
                self.pool.mark_failed(ep)
            if time.monotonic() >= deadline:
                raise httpx.ConnectError(_unavailable(self.pool, last_error), request=request)
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            self.pool.refresh()

    def close(self) -> None:
        self.inner.close()
        self.pool.close()


class AsyncFailoverTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of :class:`FailoverTransport`."""

    def __init__(self, pool: AsyncClient, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.pool = pool
        self.inner = inner or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        deadline = time.monotonic() + self.pool.retry_timeout
        backoff, last_error = 0.05, "no READY replica"
        if self.pool.refresh_due():
            await self.pool.refresh()
        while True:
            for ep in self.pool.rotation():
                try:
                    resp = await self.inner.handle_async_request(retarget(request, ep))
                except RETRY_ERRORS as exc:
                    last_error = _failed(ep, f"{type(exc).__name__}: {exc}")
                else:
                    if resp.status_code not in RETRY_STATUSES:
                        return _answered(self.pool, resp, ep)
                    await resp.aread()
                    await resp.aclose()
                    last_error = _failed(ep, f"HTTP {resp.status_code}")
                self.pool.mark_failed(ep)
            if time.monotonic() >= deadline:
                raise httpx.ConnectError(_unavailable(self.pool, last_error), request=request)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)
            await self.pool.refresh()

    async def aclose(self) -> None:
        await self.inner.aclose()
        await self.pool.aclose()


def _pool_kwargs(
    runs_root: str | os.PathLike[str] | None,
    site: str | None,
    token: str | None,
    retry_timeout: float,
    refresh_interval: float,
) -> dict[str, Any]:
    return {
        "runs_root": runs_root, "site": site, "token": token,
        "retry_timeout": retry_timeout, "refresh_interval": refresh_interval,
    }  # fmt: skip


def http_client(
    target: str,
    *,
    site: str | None = None,
    runs_root: str | os.PathLike[str] | None = None,
    token: str | None = None,
    retry_timeout: float = 60.0,
    refresh_interval: float = 2.0,
    timeout: float = 600.0,
) -> httpx.Client:
    """An ``httpx.Client`` whose requests (to any host) go to ``target``'s replicas.

    ``target`` is what :class:`~aimass_hpc.serve.client.Client` takes (a model ref or base
    URLs); a missing service fails here with NotFoundError, in one line.
    """
    pool = Client(target, **_pool_kwargs(runs_root, site, token, retry_timeout, refresh_interval))
    try:
        pool.refresh()
    except BaseException:
        pool.close()
        raise
    return httpx.Client(
        transport=FailoverTransport(pool), base_url=SERVICE_BASE_URL, timeout=timeout,
        trust_env=False,
    )  # fmt: skip


def async_http_client(
    target: str,
    *,
    site: str | None = None,
    runs_root: str | os.PathLike[str] | None = None,
    token: str | None = None,
    retry_timeout: float = 60.0,
    refresh_interval: float = 2.0,
    timeout: float = 600.0,
) -> httpx.AsyncClient:
    """The asyncio twin of :func:`http_client` (the records are first read on first use)."""
    pool = AsyncClient(
        target, **_pool_kwargs(runs_root, site, token, retry_timeout, refresh_interval)
    )
    return over_pool(pool, timeout=timeout)


def over_pool(pool: AsyncClient, *, timeout: float = 600.0) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` whose requests go to ``pool``'s replicas (closes it too)."""
    return httpx.AsyncClient(
        transport=AsyncFailoverTransport(pool), base_url=SERVICE_BASE_URL, timeout=timeout,
        trust_env=False,
    )  # fmt: skip


def openai_client(
    target: str,
    *,
    site: str | None = None,
    runs_root: str | os.PathLike[str] | None = None,
    token: str | None = None,
    retry_timeout: float = 60.0,
    refresh_interval: float = 2.0,
    **kw: Any,
) -> openai.OpenAI:
    """An ``openai.OpenAI`` for the LLM service ``target`` with replica failover.

    ``target``, ``site``, ``runs_root`` and ``token`` as :class:`~aimass_hpc.serve.client.Client`
    takes them; other keywords go to ``openai.OpenAI`` (``timeout``, ...). The transport does
    the retrying, so ``max_retries`` is 0 unless given.
    """
    import openai

    http = http_client(
        target,
        site=site,
        runs_root=runs_root,
        token=token,
        retry_timeout=retry_timeout,
        refresh_interval=refresh_interval,
    )  # fmt: skip  (openai sets each request's timeout itself)
    kw.setdefault("max_retries", 0)
    # The key is replaced per replica by the transport; the client only insists on one.
    return openai.OpenAI(
        base_url=SERVICE_BASE_URL,
        api_key=token or "aimass",
        http_client=http,  # type: ignore[arg-type]  # openai 3 takes httpx and httpx2 clients
        **kw,
    )


def async_openai_client(
    target: str,
    *,
    site: str | None = None,
    runs_root: str | os.PathLike[str] | None = None,
    token: str | None = None,
    retry_timeout: float = 60.0,
    refresh_interval: float = 2.0,
    **kw: Any,
) -> openai.AsyncOpenAI:
    """The asyncio twin of :func:`openai_client` (an ``openai.AsyncOpenAI``)."""
    import openai

    http = async_http_client(
        target, site=site, runs_root=runs_root, token=token, retry_timeout=retry_timeout,
        refresh_interval=refresh_interval,
    )  # fmt: skip
    kw.setdefault("max_retries", 0)
    return openai.AsyncOpenAI(
        base_url=SERVICE_BASE_URL,
        api_key=token or "aimass",
        http_client=http,  # type: ignore[arg-type]  # openai 3 takes httpx and httpx2 clients
        **kw,
    )


def is_llm_service(client: Client) -> bool:
    """True when ``client``'s replicas answer ``GET /v1/models`` the OpenAI way (vLLM's
    ``{"object": "list", "data": [...]}``; the built-in server answers ``{"models": [...]}``)."""
    for ep in client.endpoints():
        try:
            resp = httpx.get(
                f"{ep.url}/v1/models", headers=ep.headers, timeout=PROBE_TIMEOUT_S,
                trust_env=False,
            )  # fmt: skip
            doc = resp.json() if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            continue
        if isinstance(doc, dict):
            return isinstance(doc.get("data"), list) and "models" not in doc
    return False
