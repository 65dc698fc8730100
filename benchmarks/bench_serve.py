"""Served throughput under concurrent load vs the model's raw batched forward, on CPU.

The peer is the same MLP called in one process on batches of ``--max-batch`` rows (no HTTP,
no serialisation): the best a service on this machine could do. The service is the real
``python -m aimass_hpc.serve`` replica; the load comes from an asyncio HTTP/1.1 generator with
``--concurrency`` keep-alive connections (64 by default) in this process. Both sides use
``--threads`` torch threads. Each request carries ``--rows`` samples (1 and 16 by default:
with one sample per request the HTTP work per request, ~150 us of Python here, outweighs the
MLP's ~50 us per sample, so the event loop and not the model is the limit).

Printed: samples/s, the ratio to the raw batched forward (measured again after every row: on a
shared machine the load drifts), p50/p99 latency and the mean batch the server formed, for
batching on/off and JSON/.npy bodies. Target: batching >= 0.8x.

    python benchmarks/bench_serve.py                 # ~1 minute
    python benchmarks/bench_serve.py --duration 3 --formats npy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from aimass_hpc.serve import toymodels  # noqa: E402
from aimass_hpc.serve.client import encode_request  # noqa: E402
from aimass_hpc.serve.loadgen import run_load  # noqa: E402
from aimass_hpc.serve.local import LocalReplica  # noqa: E402


def raw_forward(model: torch.nn.Module, rows: int, in_features: int, seconds: float) -> float:
    """Samples/s of the bare module on batches of ``rows`` (inference mode, one process)."""
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        return n * rows / (time.perf_counter() - t0)


def batch_totals(url: str, token: str) -> tuple[float, float]:
    """(rows forwarded, forwards) so far, from the replica's batch-size histogram."""
    text = httpx.get(
        url + "/metrics", headers={"Authorization": f"Bearer {token}"}, trust_env=False
    ).text
    total = float(re.search(r"^aimass_serve_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^aimass_serve_batch_size_count (\S+)", text, re.M).group(1))
    return total, count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--in-features", type=int, default=256)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out-features", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--rows", default="1,16", help="samples per request (comma list)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=2.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    p.add_argument("--formats", default="json,npy")
    p.add_argument("--modes", default="batching,no-batching")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    kwargs = {
        "in_features": args.in_features,
        "hidden": args.hidden,
        "out_features": args.out_features,
        "depth": args.depth,
    }
    model = toymodels.mlp(**kwargs).eval()
    raw = raw_forward(model, args.max_batch, args.in_features, args.duration)
    raw1 = raw_forward(model, 1, args.in_features, args.duration)
    rng = np.random.default_rng(0)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        weights = Path(tmp) / "w.pt"
        torch.save(model.state_dict(), weights)
        for mode in args.modes.split(","):
            extra = ["--threads", str(args.threads), "--max-batch-size", str(args.max_batch)]
            extra += ["--max-wait-ms", str(args.max_wait_ms)]
            if mode == "no-batching":
                extra.append("--no-batching")
            rep = LocalReplica(
                Path(tmp) / f"run-{mode}",
                recipe=toymodels.recipe(**kwargs),
                weights=weights,
                name="bench",
                extra_args=extra,
            )
            with rep:
                rep.wait_ready()
                for n_rows in [int(r) for r in args.rows.split(",")]:
                    x = rng.standard_normal((n_rows, args.in_features)).astype(np.float32)
                    for fmt in args.formats.split(","):
                        body, headers = encode_request(x, binary=fmt == "npy")
                        headers["Authorization"] = f"Bearer {rep.token}"
                        before = batch_totals(rep.url, rep.token)
                        res = asyncio.run(
                            run_load(
                                rep.url,
                                body,
                                headers,
                                concurrency=args.concurrency,
                                duration_s=args.duration,
                                rows_per_request=n_rows,
                            )
                        )
                        after = batch_totals(rep.url, rep.token)
                        batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                        # The peer again, right after: the machine's load drifts (shared).
                        peer = raw_forward(model, args.max_batch, args.in_features, 2.0)
                        rows.append((mode, fmt, n_rows, res, batch, peer))

    cpu = os.cpu_count()
    print(
        f"\nMLP {args.in_features}-{args.hidden}x{args.depth}-{args.out_features}, "
        f"{args.concurrency} connections, {args.threads} torch thread(s), {cpu} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, {args.duration:g}s per row"
    )
    print(f"peer: raw forward, batch {args.max_batch}: {raw:,.0f} samples/s at the start;")
    print("      'raw now' is it again right after each row, 'vs raw' uses the mean of both")
    print(f"      raw forward, batch 1: {raw1:,.0f} samples/s ({raw1 / raw:.2f}x)\n")
    head = (
        f"{'mode':<12}{'body':<6}{'rows':>5}{'req/s':>9}{'samples/s':>11}{'raw now':>9}"
        f"{'vs raw':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'failed':>8}"
    )
    print(head)
    print("-" * len(head))
    out = []
    for mode, fmt, n_rows, res, batch, peer in rows:
        ratio = res.samples_per_s / ((raw + peer) / 2)  # vs the peer around the measurement
        print(
            f"{mode:<12}{fmt:<6}{n_rows:>5}{res.requests_per_s:>9,.0f}{res.samples_per_s:>11,.0f}"
            f"{peer:>9,.0f}{ratio:>7.2f}x{res.percentile_ms(50):>9.1f}"
            f"{res.percentile_ms(99):>9.1f}{batch:>7.1f}{res.failed:>8}"
        )
        out.append(
            {
                "mode": mode,
                "format": fmt,
                "rows_per_request": n_rows,
                "samples_per_s": res.samples_per_s,
                "ratio": ratio,
                "p50_ms": res.percentile_ms(50),
                "p99_ms": res.percentile_ms(99),
                "mean_batch": batch,
                "failed": res.failed,
            }
        )
    print(json.dumps({"raw_samples_per_s": raw, "rows": out}), file=sys.stderr)


if __name__ == "__main__":
    main()
