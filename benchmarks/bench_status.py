"""How much a status poll of N jobs costs: aimass (one squeue call) against the usual peers.

Needs the local cluster (`scripts/dev-cluster up`). Submits N held jobs (they never run),
times each way of asking for their state, prints a table of calls, wall time and the ratio to
aimass, then cancels the jobs.

    .venv/bin/python benchmarks/bench_status.py [--jobs 1 10 50] [--repeat 5]

Peers:
  aimass          SlurmScheduler.status(ids): one `squeue --me --states=all -O ...`
  squeue-per-job  one `squeue -j ID` per job (what a naive poll loop does)
  scontrol-per-job one `scontrol show job ID` per job
  sacct-batch     one `sacct --jobs=...` (accounting; lags the controller)
  submitit-style  one `sacct -j ...` with its -o format (submitit polls sacct in one batch)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aimass_hpc.config.job_spec import JobRequest  # noqa: E402
from aimass_hpc.config.site import load_site  # noqa: E402
from aimass_hpc.launch.scheduler import CountingRunner, get_scheduler  # noqa: E402
from aimass_hpc.launch.submit import submit  # noqa: E402


def _cluster_env() -> None:
    out = subprocess.run(
        [str(ROOT / "scripts" / "dev-cluster"), "env"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        line = line.removeprefix("export ").strip()
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            os.environ[key] = value.strip("'\"")


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, check=False)


def _time(fn, repeat: int) -> float:
    fn()  # warm-up: first calls pay for connection set-up and page cache
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    _cluster_env()
    site = load_site("dev")
    runs = Path(tempfile.mkdtemp(prefix="aimass-bench-"))
    ids: list[str] = []
    try:
        print(f"{'jobs':>5} {'peer':<17} {'calls':>6} {'median ms':>10} {'x aimass':>9}")
        for n in sorted(args.jobs):
            while len(ids) < n:
                request = JobRequest(
                    name=f"bench-{len(ids)}", command=["true"], time="5", sbatch_extra=["--hold"]
                )
                ids.append(submit(site, request, runs_root=runs).job_id or "")
            batch = ids[:n]
            runner = CountingRunner()
            sched = get_scheduler(site, runner=runner)
            peers = {
                "aimass": (lambda b=batch, s=sched: s.status(b), None),
                "squeue-per-job": (lambda b=batch: [_run(["squeue", "-h", "-j", i]) for i in b], n),
                "scontrol-per-job": (
                    lambda b=batch: [_run(["scontrol", "show", "job", i]) for i in b],
                    n,
                ),
                "sacct-batch": (
                    lambda b=batch: _run(
                        [
                            "sacct",
                            "-X",
                            "-n",
                            "-P",
                            f"--jobs={','.join(b)}",
                            "--format=JobID,State,Elapsed",
                        ]
                    ),
                    1,
                ),
                "submitit-style": (
                    lambda b=batch: _run(
                        [
                            "sacct",
                            "-o",
                            "JobID,State,NodeList",
                            "--parsable2",
                            *[x for i in b for x in ("-j", i)],
                        ]
                    ),
                    1,
                ),
            }
            base = None
            for peer, (fn, calls) in peers.items():
                runner.calls.clear()
                seconds = _time(fn, args.repeat)
                if calls is None:
                    calls = len(runner.calls) // (args.repeat + 1)
                base = base or seconds
                print(
                    f"{n:>5} {peer:<17} {calls:>6} {seconds * 1000:>10.1f} {seconds / base:>9.2f}"
                )
    finally:
        if ids:
            _run(["scancel", *ids])


if __name__ == "__main__":
    main()
