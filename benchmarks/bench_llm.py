"""The LLM latency table of a 1-replica vLLM service on the dev cluster (issue 14).

A tiny random-weight Llama (``aimass_hpc/serve/tiny_llm.py``, built by the vLLM environment
``.venv-vllm`` that ``scripts/setup-vllm`` makes) is imported with ``aimass models import-hf``
and served with ``aimass serve start tiny --engine vllm`` on the local Slurm cluster
(``scripts/dev-cluster up``). For each concurrency the closed-loop streaming load of
``aimass bench`` (:func:`aimass_hpc.serve.llm_bench.bench_llm`) runs against it; printed per
row: requests/s, output tokens/s, time to first token (TTFT) and inter-token latency (ITL)
percentiles in ms, failed requests. vLLM's CPU build on a shared 2-core machine: the figures
describe this machine, not vLLM on a GPU.

    python benchmarks/bench_llm.py                         # ~3 minutes (start-up included)
    python benchmarks/bench_llm.py --concurrency 1,4,16 --max-tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the dev-cluster site writer the tests use

from _sitefixtures import site_data, write_site  # noqa: E402

from aimass_hpc.serve import tiny_llm  # noqa: E402
from aimass_hpc.serve.llm_bench import bench_llm  # noqa: E402

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
COLUMNS = [
    ("concurrency", "conc"), ("requests_per_s", "req/s"), ("output_tokens_per_s", "tok/s"),
    ("ttft_p50_ms", "TTFT p50"), ("ttft_p90_ms", "p90"), ("ttft_p99_ms", "p99"),
    ("itl_p50_ms", "ITL p50"), ("itl_p90_ms", "p90"), ("itl_p99_ms", "p99"),
    ("requests_failed", "failed"),
]  # fmt: skip


def aimass(*args: str, timeout: float = 900) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"aimass {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Serve the tiny model, measure each concurrency, stop it; the report."""
    if not VLLM_PYTHON.exists():
        raise SystemExit(f"{VLLM_PYTHON} is missing: run scripts/setup-vllm")
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        serving = site_data("dev")["serving"]
        serving["vllm"] = {**serving.get("vllm", {}), "python": str(VLLM_PYTHON)}
        site = write_site(Path(tmp), "dev", serving=serving)
        sf = str(site.source)
        built = subprocess.run([str(VLLM_PYTHON), tiny_llm.__file__, f"{tmp}/tiny-hf"],
                               capture_output=True, text=True, timeout=300)  # fmt: skip
        if built.returncode != 0:
            raise SystemExit(f"building the tiny model failed: {built.stderr.strip()}")
        aimass("models", "--site", sf, "import-hf", f"{tmp}/tiny-hf", "tiny")
        started = json.loads(aimass(
            "serve", "start", "tiny:1", "--engine", "vllm", "--site", sf, "--cpus", "2",
            "--wait", "--timeout", "600", "--json",
        ))  # fmt: skip
        rows = []
        try:
            for conc in [int(c) for c in args.concurrency.split(",") if c.strip()]:
                rows.append(bench_llm(
                    "tiny", runs_root=site.runs_root, concurrency=conc,
                    prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                    duration=args.duration,
                ))  # fmt: skip
        finally:
            subprocess.run([sys.executable, "-m", "aimass_hpc", "serve", "stop", "tiny",
                            "--site", sf], capture_output=True, timeout=300)  # fmt: skip
    return {
        "engine": "vllm (CPU build)", "replicas": 1, "endpoints": started.get("endpoints"),
        "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "duration_s": args.duration, "rows": rows,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated (default 1,4,8)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per row")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    row0 = report["rows"][0] if report["rows"] else {}
    table = Table(
        title=f"tiny Llama, 1 vLLM replica (CPU), prompt ~{row0.get('prompt_tokens')} tokens, "
        f"{args.max_tokens} generated, {args.duration:g} s per row; latencies in ms"
    )
    for _, head in COLUMNS:
        table.add_column(head, justify="right")
    for row in report["rows"]:
        table.add_row(*("-" if row.get(k) is None else str(row.get(k)) for k, _ in COLUMNS))
    Console(width=max(Console().width, 110)).print(table)  # no column cut in a pipe
    for row in report["rows"]:
        if row.get("first_error"):
            print(f"concurrency {row['concurrency']}: first error: {row['first_error']}")


if __name__ == "__main__":
    main()
