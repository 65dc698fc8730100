"""Served throughput under concurrent load vs the model's raw batched forward, on CPU.

The peer is the same MLP called in one process on batches of ``--max-batch`` rows (no HTTP,
no serialisation): the best a service on this machine could do. The service is the real
``python -m aimass_hpc.serve`` replica; the load comes from an asyncio HTTP/1.1 generator with
``--concurrency`` keep-alive connections (64 by default) in this process. Both sides use
``--threads`` torch threads. Each request carries ``--rows`` samples (1 and 16 by default:
with one sample per request the HTTP work per request, ~150 us of Python here, outweighs the
MLP's ~50 us per sample, so the event loop and not the model is the limit).

Printed: samples/s, the ratio to the raw batched forward (measured again after every row: on a
shared machine the load drifts), p50/p99 latency, the mean batch the server formed, and the
CPU time per request of the replica ("srv us", all its threads and its model process: HTTP,
codec and forward) and of the load generator ("gen us"), and how fast the model process runs
the model against the raw forward alone ("model x"), for batching with the model in its own
process (the default), batching with the model on a thread of the HTTP process
(``in-process``) and no batching, with JSON/.npy bodies. CPU time per request depends less on
what else the machine runs than samples/s, so it says where time goes even when samples/s
does not. Target: batching >= 0.8x.

``--pin`` gives the load generator the last CPU and the replica (and the raw forward) the
others, so that the load generator does not take time from the service it measures; on a
2-CPU machine the replica then has one core for HTTP and the forward together, as the peer.

    python benchmarks/bench_serve.py                 # ~1 minute
    python benchmarks/bench_serve.py --duration 3 --formats npy
    python benchmarks/bench_serve.py --pin --rows 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
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
from aimass_hpc.serve.loadgen import run_load_sync  # noqa: E402
from aimass_hpc.serve.local import LocalReplica  # noqa: E402

# CPU microseconds per sample of the last raw_forward call (load-independent, unlike samples/s).
RAW_CPU_US: dict[int, float] = {}


def raw_forward(model: torch.nn.Module, rows: int, in_features: int, seconds: float) -> float:
    """Samples/s of the bare module on batches of ``rows`` (inference mode, one process)."""
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        for _ in range(20):
            model(x)
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += 1
        RAW_CPU_US[rows] = (time.process_time() - c0) / (n * rows) * 1e6
        return n * rows / (time.perf_counter() - t0)


def batch_totals(url: str, token: str) -> tuple[float, float]:
    """(rows forwarded, forwards) so far, from the replica's batch-size histogram."""
    text = httpx.get(
        url + "/metrics", headers={"Authorization": f"Bearer {token}"}, trust_env=False
    ).text
    pattern = r"^aimass_serve_batch_size_{} (\S+)"
    found = [re.search(pattern.format(k), text, re.M) for k in ("sum", "count")]
    if found[0] is None or found[1] is None:
        raise RuntimeError(f"{url}/metrics has no aimass_serve_batch_size histogram")
    return float(found[0].group(1)), float(found[1].group(1))


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its children (the model
    process), all threads (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + children_cpu_s(pid)


def children_cpu_s(pid: int) -> float:
    """CPU seconds of the children of ``pid``: the model process (and multiprocessing's
    resource tracker, which idles); 0 for a replica without a model process."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return 0.0
    return sum(process_cpu_s(c) for c in children)


def own_cpu_s() -> float:
    """User + system CPU seconds of this process so far (the load generator's side)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pin_process(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of ``pid`` (threads started later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError, PermissionError):  # a thread just ended
            os.sched_setaffinity(int(tid), cpus)


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
    p.add_argument(
        "--modes",
        default="batching,in-process,no-batching",
        help="batching: the default replica (the model in its own process); in-process: "
        "batching with the model on a thread of the HTTP process; no-batching",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="load generator on the last CPU, replica and raw forward on the others",
    )
    args = p.parse_args()

    all_cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(all_cpus) < 2:
        p.error("--pin needs at least 2 CPUs")
    gen_cpus = {all_cpus[-1]} if args.pin else set(all_cpus)
    srv_cpus = set(all_cpus[:-1]) if args.pin else set(all_cpus)
    os.sched_setaffinity(0, srv_cpus)  # the raw forward runs where the replica will
    torch.set_num_threads(args.threads)
    kwargs = {
        "in_features": args.in_features,
        "hidden": args.hidden,
        "out_features": args.out_features,
        "depth": args.depth,
    }
    model = toymodels.mlp(**kwargs).eval()
    raw = raw_forward(model, args.max_batch, args.in_features, args.duration)
    raw_cpu = RAW_CPU_US[args.max_batch]
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
            elif mode == "in-process":  # batching, the model on a thread of the replica
                extra.append("--in-process")
            rep = LocalReplica(
                Path(tmp) / f"run-{mode}",
                recipe=toymodels.recipe(**kwargs),
                weights=weights,
                name="bench",
                extra_args=extra,
            )
            with rep:
                rep.wait_ready()
                pin_process(rep.proc.pid, srv_cpus)
                for n_rows in [int(r) for r in args.rows.split(",")]:
                    x = rng.standard_normal((n_rows, args.in_features)).astype(np.float32)
                    for fmt in args.formats.split(","):
                        body, headers = encode_request(x, binary=fmt == "npy")
                        headers["Authorization"] = f"Bearer {rep.token}"
                        before = batch_totals(rep.url, rep.token)
                        os.sched_setaffinity(0, gen_cpus)
                        pid = rep.proc.pid
                        cpu0 = (process_cpu_s(pid), own_cpu_s(), children_cpu_s(pid))
                        res = run_load_sync(
                            rep.url,
                            body,
                            headers,
                            concurrency=args.concurrency,
                            duration_s=args.duration,
                            rows_per_request=n_rows,
                        )
                        cpu1 = (process_cpu_s(pid), own_cpu_s(), children_cpu_s(pid))
                        os.sched_setaffinity(0, srv_cpus)
                        after = batch_totals(rep.url, rep.token)
                        batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
                        # CPU per request over the whole run (warm-up included, as requests).
                        n_req = max(after[1] - before[1], 1) * batch / n_rows
                        # The peer again, right after: the machine's load drifts (shared).
                        peer = raw_forward(model, args.max_batch, args.in_features, 2.0)
                        model_s = cpu1[2] - cpu0[2]
                        cpu = (
                            (cpu1[0] - cpu0[0]) / n_req * 1e6,
                            (cpu1[1] - cpu0[1]) / n_req * 1e6,
                            (raw_cpu + RAW_CPU_US[args.max_batch]) / 2,
                            model_s / (n_req * n_rows) * 1e6 if model_s > 0 else float("nan"),
                        )
                        rows.append((mode, fmt, n_rows, res, batch, peer, cpu))

    print(
        f"\nMLP {args.in_features}-{args.hidden}x{args.depth}-{args.out_features}, "
        f"{args.concurrency} connections, {args.threads} torch thread(s), {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, {args.duration:g}s per row"
        + (f", replica on CPUs {sorted(srv_cpus)}, load on {sorted(gen_cpus)}" if args.pin else "")
    )
    print(f"peer: raw forward, batch {args.max_batch}: {raw:,.0f} samples/s at the start;")
    print("      'raw now' is it again right after each row, 'vs raw' uses the mean of both")
    print(f"      raw forward, batch 1: {raw1:,.0f} samples/s ({raw1 / raw:.2f}x)")
    print(f"      raw forward CPU time, batch {args.max_batch}: {raw_cpu:.1f} us/sample")
    print("'srv us'/'gen us': CPU us per request of the replica / the load generator; 'cpu x':")
    print("      raw forward CPU per sample / replica CPU per sample (the share that is model)")
    print("'model x': raw forward CPU per sample / the model process's CPU per sample: how fast")
    print("      the model runs while serving, against alone (the model process is the limit)\n")
    head = (
        f"{'mode':<12}{'body':<6}{'rows':>5}{'req/s':>9}{'samples/s':>11}{'raw now':>9}"
        f"{'vs raw':>8}{'p50 ms':>9}{'p99 ms':>9}{'batch':>7}{'failed':>8}"
        f"{'srv us':>8}{'gen us':>8}{'cpu x':>7}{'model x':>9}"
    )
    print(head)
    print("-" * len(head))
    out = []
    for mode, fmt, n_rows, res, batch, peer, cpu in rows:
        ratio = res.samples_per_s / ((raw + peer) / 2)  # vs the peer around the measurement
        print(
            f"{mode:<12}{fmt:<6}{n_rows:>5}{res.requests_per_s:>9,.0f}{res.samples_per_s:>11,.0f}"
            f"{peer:>9,.0f}{ratio:>7.2f}x{res.percentile_ms(50):>9.1f}"
            f"{res.percentile_ms(99):>9.1f}{batch:>7.1f}{res.failed:>8}"
            f"{cpu[0]:>8,.0f}{cpu[1]:>8,.0f}{cpu[2] * n_rows / cpu[0]:>6.2f}x"
            + (f"{cpu[2] / cpu[3]:>8.2f}x" if cpu[3] == cpu[3] else f"{'-':>9}")
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
                "server_cpu_us_per_request": cpu[0],
                "loadgen_cpu_us_per_request": cpu[1],
                "cpu_ratio": cpu[2] * n_rows / cpu[0],
                "model_process_cpu_us_per_sample": cpu[3] if cpu[3] == cpu[3] else None,
            }
        )
    print(json.dumps({"raw_samples_per_s": raw, "rows": out}), file=sys.stderr)


if __name__ == "__main__":
    main()
