"""The load test of a service, one for ``aimass bench`` and the dashboard's performance form:
a random input of the model's shape (or a given one), one checked request, then the
closed-loop load generator (:mod:`.loadgen`) against every live replica."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aimass_hpc.common.errors import InputError
from aimass_hpc.serve.client import Client, encode_request
from aimass_hpc.serve.loadgen import run_load_sync

# One sample's values at most (a typo such as 3,32000,32000 must not allocate 12 GiB).
MAX_SAMPLE_VALUES = 1 << 24
PERCENTILES = (50, 90, 95, 99)


def parse_shape(text: str, where: str = "--shape") -> list[int]:
    """``3,32,32`` (or ``3x32x32``) -> ``[3, 32, 32]``; InputError naming ``where``."""
    try:
        dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
    except ValueError:
        raise InputError(f"{where} {text!r}: give sizes like 3,32,32") from None
    if not dims or any(d < 1 for d in dims) or math.prod(dims) > MAX_SAMPLE_VALUES:
        raise InputError(f"{where} {text!r}: sizes must be positive (at most 16M values)")
    return dims


def bench_service(
    client: Client,
    *,
    batch: int,
    shape: list[int] | None = None,
    dtype: str | None = None,
    concurrency: int = 64,
    duration: float = 10.0,
    binary: bool = True,
    progress: Callable[[float, int], None] | None = None,
) -> dict[str, Any]:
    """Load-test the live replicas ``client`` knows; blocks for ``1 + duration`` seconds.

    The report: replicas, model and version, input/output shapes, requests ok/failed,
    requests/s, samples/s and latency percentiles in ms (None where nothing finished).
    """
    import numpy as np

    live = client.endpoints()
    if not live:
        raise InputError(f"no live replica of {client.target!r}")
    info = client.models()[0]
    dims = shape or info.get("input_shape")
    if not dims or any(d is None or d < 1 for d in dims):
        raise InputError(f"the model's input shape is {dims}; give a shape, e.g. 3,32,32")
    x = np.random.default_rng(0).standard_normal((batch, *dims))
    x = x.astype(dtype or info.get("input_dtype") or "float32")
    first = client.predict(x, binary=binary)  # a bad shape or dtype fails here, in one line
    payload, headers = encode_request(x, binary=binary)
    result = run_load_sync(
        [ep.url for ep in live], payload, [{**headers, **ep.headers} for ep in live],
        concurrency=concurrency, duration_s=duration, warmup_s=1.0,
        rows_per_request=batch, progress=progress,
    )  # fmt: skip
    pct = {f"p{q}_ms": result.percentile_ms(q) for q in PERCENTILES}
    return {
        "replicas": len(live),
        "model": info.get("name"),
        "version": info.get("version"),
        "input_shape": [batch, *dims],
        "output_shape": list(first.shape),
        "format": "npy" if binary else "json",
        "concurrency": concurrency,
        "seconds": round(result.seconds, 3),
        "requests_ok": result.ok,
        "requests_failed": result.failed,
        "requests_per_s": round(result.requests_per_s, 1),
        "samples_per_s": round(result.samples_per_s, 1),
        **{k: None if math.isnan(v) else round(v, 2) for k, v in pct.items()},
    }
