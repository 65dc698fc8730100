"""A lean asyncio HTTP/1.1 load generator: N keep-alive connections, one request in flight each.

httpx costs far more CPU per request than the server it measures, which on a small machine
turns a load test into a test of the client. This generator writes a pre-built request and
reads the answer with asyncio streams, about the cost of ``wrk``'s Lua-less mode, so the
numbers describe the service. Used by ``benchmarks/bench_serve.py`` and ``aimass bench``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np


@dataclass
class LoadResult:
    """What a load run measured (latencies in seconds, of requests after the warm-up)."""

    seconds: float
    latencies: np.ndarray
    statuses: Counter = field(default_factory=Counter)
    errors: int = 0
    rows_per_request: int = 1

    @property
    def ok(self) -> int:
        return int(self.statuses.get(200, 0))

    @property
    def failed(self) -> int:
        return self.errors + sum(n for s, n in self.statuses.items() if s != 200)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def samples_per_s(self) -> float:
        return self.requests_per_s * self.rows_per_request

    def percentile_ms(self, q: float) -> float:
        if not len(self.latencies):
            return float("nan")
        return float(np.percentile(self.latencies, q) * 1000.0)


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def roundtrip(self, request: bytes) -> int:
        """Send one request, read the whole answer; returns the status code."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        # Byte-level lookups of the three headers that matter (this runs once per request,
        # on the same CPUs as the service it measures).
        low = head.lower()
        length = int(_header(low, b"content-length") or 0)
        chunked = b"chunked" in (_header(low, b"transfer-encoding") or b"")
        close = _header(low, b"connection") == b"close"
        if chunked:
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length:
            await self.reader.readexactly(length)
        if close:
            self.close()
        return status


def _header(head: bytes, name: bytes) -> bytes | None:
    """The stripped value of header ``name`` in a lower-cased response head, or None."""
    at = head.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at + len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


def build_request(url: str, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
    """The raw bytes of one ``POST path`` with ``body`` to ``url``."""
    parts = urlsplit(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1") + body


async def run_load(
    url: str | Sequence[str],
    body: bytes,
    headers: Mapping[str, str] | Sequence[Mapping[str, str]],
    *,
    path: str = "/v1/predict",
    concurrency: int = 64,
    duration_s: float = 5.0,
    warmup_s: float = 0.5,
    rows_per_request: int = 1,
    progress: Callable[[float, int], None] | None = None,
) -> LoadResult:
    """Keep ``concurrency`` requests in flight for ``warmup_s + duration_s`` seconds.

    Several URLs (replicas; ``headers`` then one mapping per URL) share the connections
    round robin. ``progress(fraction_done, ok_requests)`` is called about ten times a second.
    """
    urls = [url] if isinstance(url, str) else list(url)
    heads = [headers] * len(urls) if isinstance(headers, Mapping) else list(headers)
    targets = []
    for u, h in zip(urls, heads, strict=True):
        parts = urlsplit(u)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        targets.append((host, port, build_request(u, path, body, h)))
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    latencies: list[float] = []
    statuses: Counter = Counter()
    errors = 0

    async def worker(i: int) -> None:
        nonlocal errors
        host, port, request = targets[i % len(targets)]
        conn = _Conn(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    return
                try:
                    status = await conn.roundtrip(request)
                except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                    conn.close()
                    if t0 >= t_measure:
                        errors += 1
                    await asyncio.sleep(0.01)
                    continue
                if t0 >= t_measure:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] += 1
        finally:
            conn.close()

    async def reporter() -> None:
        total = warmup_s + duration_s
        while True:
            now = time.perf_counter()
            if progress is not None:
                progress(min(1.0, (now - t_start) / total), statuses.get(200, 0))
            if now >= t_end:
                return
            await asyncio.sleep(0.1)

    rep = asyncio.create_task(reporter())
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    await rep
    measured = min(time.perf_counter(), t_end) - t_measure
    return LoadResult(
        seconds=max(measured, 1e-9),
        latencies=np.asarray(latencies),
        statuses=statuses,
        errors=errors,
        rows_per_request=rows_per_request,
    )


def run_load_sync(*args: Any, **kwargs: Any) -> LoadResult:
    """:func:`run_load` on a fresh event loop: uvloop when installed, which takes about a
    third less CPU per request than asyncio's own loop -- CPU the service under test gets."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(run_load(*args, **kwargs))
