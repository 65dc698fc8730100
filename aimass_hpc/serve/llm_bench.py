"""The load test of an LLM service (``aimass bench NAME`` when NAME is a vLLM service).

Closed loop: ``concurrency`` workers each keep one streaming ``POST /v1/completions`` in
flight (a prompt of about ``prompt_len`` tokens, exactly ``max_tokens`` generated: vLLM's
``ignore_eos``) through the failover transport of :mod:`aimass_hpc.serve.llm`. For every
request started after the warm-up it records the time to the first token (TTFT), the gaps
between later tokens (inter-token latency, ITL) and the tokens the server counted (the
stream's ``usage``); the report has requests/s, output tokens/s and the percentiles.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from aimass_hpc.common.errors import InputError
from aimass_hpc.serve.client import AsyncClient
from aimass_hpc.serve.llm import SERVICE_BASE_URL, over_pool

PERCENTILES = (50, 90, 99)
PROMPT_WORD = " the"  # one token in most vocabularies (the prompt is measured anyway)


@dataclass
class StreamStats:
    """What the measured requests of a run saw (seconds)."""

    ok: int = 0
    failed: int = 0
    output_tokens: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def make_prompt(words: int) -> str:
    """A prompt of ``words`` words (about as many tokens)."""
    return PROMPT_WORD * max(words, 1)


async def fit_prompt(http: httpx.AsyncClient, model: str, prompt_len: int) -> str:
    """A prompt of about ``prompt_len`` tokens, measured with vLLM's ``POST /tokenize`` (the
    word count stands when the server has no such route)."""
    words = prompt_len
    for _ in range(2):
        try:
            resp = await http.post(
                f"{SERVICE_BASE_URL.rsplit('/', 1)[0]}/tokenize",
                json={"model": model, "prompt": make_prompt(words)},
            )
            count = int(resp.json()["count"]) if resp.status_code == 200 else 0
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            count = 0
        if count <= 0 or count == prompt_len:
            break
        words = max(1, round(words * prompt_len / count))
    return make_prompt(words)


async def stream_completion(
    http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
) -> tuple[float | None, list[float], int, int | None]:
    """One streaming completion: (TTFT, inter-token gaps, output tokens, prompt tokens).

    Raises ``RuntimeError`` for an answer other than 200 (with the server's words).
    """
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
        "ignore_eos": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    ttft: float | None = None
    last = t0
    gaps: list[float] = []
    chunks, usage = 0, None
    async with http.stream("POST", "/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")[:200]
            raise RuntimeError(f"HTTP {resp.status_code}: {text}")
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            doc = json.loads(data)
            if doc.get("usage"):
                usage = doc["usage"]
            if not doc.get("choices"):
                continue
            now = time.perf_counter()  # one chunk per generated token (vLLM streams so)
            if ttft is None:
                ttft = now - t0
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    tokens = int(usage.get("completion_tokens") or chunks) if usage else chunks
    prompt_tokens = int(usage["prompt_tokens"]) if usage and "prompt_tokens" in usage else None
    return ttft, gaps, tokens, prompt_tokens


async def _served_model(http: httpx.AsyncClient) -> str:
    resp = await http.get("/models")  # under the base URL's /v1
    if resp.status_code != 200:
        raise InputError(f"GET /v1/models answered {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") if isinstance(resp.json(), dict) else None
    if not data:
        raise InputError("the service lists no model at /v1/models: is it an LLM service?")
    return str(data[0]["id"])


async def run_llm_load(
    http: httpx.AsyncClient,
    model: str,
    *,
    concurrency: int,
    prompt: str,
    max_tokens: int,
    duration_s: float,
    warmup_s: float = 1.0,
    progress: Callable[[float, int], None] | None = None,
) -> tuple[StreamStats, float]:
    """Keep ``concurrency`` streams going for ``warmup_s + duration_s``; (stats, seconds)."""
    stats = StreamStats()
    t_start = time.perf_counter()
    t_measure = t_start + warmup_s
    t_end = t_measure + duration_s
    finished = [t_end]

    async def worker() -> None:
        while (t0 := time.perf_counter()) < t_end:
            measured = t0 >= t_measure
            try:
                ttft, gaps, tokens, ptoks = await stream_completion(http, model, prompt, max_tokens)
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                if measured:
                    stats.failed += 1
                    stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])
                await asyncio.sleep(0.05)
                continue
            if not measured:
                continue
            stats.ok += 1
            stats.output_tokens += tokens
            stats.itl.extend(gaps)
            if ttft is not None:
                stats.ttft.append(ttft)
            if ptoks is not None:
                stats.prompt_tokens.append(ptoks)
            finished.append(time.perf_counter())

    async def reporter() -> None:
        total = warmup_s + duration_s
        while (now := time.perf_counter()) < t_end:
            if progress is not None:
                progress(min(1.0, (now - t_start) / total), stats.ok)
            await asyncio.sleep(0.1)

    rep = asyncio.create_task(reporter())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await rep
    if progress is not None:
        progress(1.0, stats.ok)
    return stats, max(max(finished) - t_measure, 1e-9)


def _pct_ms(values: list[float], prefix: str) -> dict[str, float | None]:
    arr = np.asarray(values, dtype=float)
    return {
        f"{prefix}_p{q}_ms": round(float(np.percentile(arr, q)) * 1000.0, 2) if len(arr) else None
        for q in PERCENTILES
    }


def bench_llm(
    target: str,
    *,
    runs_root: str | os.PathLike[str] | None = None,
    site: str | None = None,
    token: str | None = None,
    concurrency: int = 8,
    prompt_len: int = 32,
    max_tokens: int = 32,
    duration: float = 10.0,
    warmup: float = 1.0,
    progress: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Load-test the LLM service ``target``; blocks for about ``warmup + duration`` seconds.

    The report: model, replicas, the load's shape, requests ok/failed, retries (requests the
    transport moved to another replica), requests/s, output tokens/s and TTFT/ITL percentiles
    in ms (None where nothing was measured).
    """
    if prompt_len < 1 or max_tokens < 1:
        raise InputError("--prompt-len and --max-tokens must be at least 1")

    async def go() -> dict[str, Any]:
        pool = AsyncClient(target, runs_root=runs_root, site=site, token=token, retry_timeout=30.0)
        async with over_pool(pool) as http:
            replicas = len(await pool.refresh())
            model = await _served_model(http)
            prompt = await fit_prompt(http, model, prompt_len)
            stats, seconds = await run_llm_load(
                http, model, concurrency=concurrency, prompt=prompt,
                max_tokens=max_tokens, duration_s=duration, warmup_s=warmup, progress=progress,
            )  # fmt: skip
        ptoks = stats.prompt_tokens
        return {
            "engine": "vllm",
            "model": model,
            "replicas": replicas,
            "concurrency": concurrency,
            "prompt_tokens": round(sum(ptoks) / len(ptoks), 1) if ptoks else None,
            "max_tokens": max_tokens,
            "seconds": round(seconds, 3),
            "requests_ok": stats.ok,
            "requests_failed": stats.failed,
            "retries": pool.retries,
            "requests_per_s": round(stats.ok / seconds, 2),
            "output_tokens": stats.output_tokens,
            "output_tokens_per_s": round(stats.output_tokens / seconds, 1),
            **_pct_ms(stats.ttft, "ttft"),
            **_pct_ms(stats.itl, "itl"),
            "first_error": stats.errors[0] if stats.errors else None,
        }

    report = asyncio.run(go())
    if report["requests_ok"] == 0 and report["requests_failed"] == 0:
        raise InputError(f"no request finished in {duration:g}s: give a longer --duration")
    return {k: v for k, v in report.items() if not (isinstance(v, float) and math.isnan(v))}
