"""Time for the service supervisor to detect and to replace a failed replica, on the dev cluster.

A toy MLP is served with ``aimass serve toy --replicas 2 --supervise`` on the local Slurm
cluster (``scripts/dev-cluster up``) while a client predicts continuously. Each fault is
injected in turn into a READY replica:

* ``scancel``: its array task is cancelled (the replica drains and its job ends);
* ``sigkill``: the server process is killed on its node (connection refused, then the job ends);
* ``sigstop``: the server process is stopped (hung: checks time out).

Printed per fault: seconds from the fault to the supervisor's decision (detect), to the
replacement's READY record (replace), and the client's failed requests (after its retries).
Detection is bounded by ``--check-interval`` x ``--check-failures`` (+ the probe timeout, 3 s,
for a hung replica); replacement adds the scheduler's start-up and the model's load.

    python benchmarks/bench_heal.py                       # ~1 minute
    python benchmarks/bench_heal.py --check-interval 3 --faults sigstop
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the dev-cluster site writer the tests use

from _sitefixtures import write_site  # noqa: E402

from aimass_hpc.launch.serving import read_decisions  # noqa: E402
from aimass_hpc.repo import ModelRepository  # noqa: E402
from aimass_hpc.serve import Client, toymodels  # noqa: E402
from aimass_hpc.serve.endpoints import EndpointRecord, read_records  # noqa: E402

KWARGS: dict[str, Any] = {"in_features": 6, "hidden": 16, "out_features": 3}


def aimass(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=300
    )
    if proc.returncode != 0:
        raise SystemExit(f"aimass {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _ts(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


class Load(threading.Thread):
    """Continuous predictions; counts answers and failures after the client's retries."""

    def __init__(self, runs: Path) -> None:
        super().__init__(daemon=True)
        self.runs, self.ok, self.failed = runs, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        x = np.zeros((4, 6), dtype=np.float32)
        with Client("toy", runs_root=self.runs, timeout=5, retry_timeout=60,
                    refresh_interval=0.5) as client:  # fmt: skip
            while not self.stop.is_set():
                try:
                    client.predict(x)
                    self.ok += 1
                except Exception:  # noqa: BLE001 - counted, the table shows it
                    self.failed += 1
                time.sleep(0.01)


def ready(run_dir: Path, replica: int) -> EndpointRecord | None:
    return next(
        (r for r in read_records(run_dir) if r.replica == replica and r.state == "READY"), None
    )


def measure(run_dir: Path, how: str, replica: int, load: Load) -> dict[str, object]:
    victim = ready(run_dir, replica)
    assert victim is not None and victim.pid is not None, read_records(run_dir)
    failed_before = load.failed
    t0 = time.time()
    if how == "scancel":
        subprocess.run(["scancel", victim.job_id], check=True)
    else:
        os.kill(victim.pid, signal.SIGKILL if how == "sigkill" else signal.SIGSTOP)
    new = None
    while time.time() - t0 < 180:
        new = ready(run_dir, replica)
        if new is not None and new.job_id != victim.job_id:
            break
        time.sleep(0.2)
    else:
        raise SystemExit(f"{how}: replica {replica} not replaced in 180 s")
    if how == "sigstop":
        with __import__("contextlib").suppress(ProcessLookupError):
            os.kill(victim.pid, signal.SIGCONT)  # let the fenced one end
    decided = [
        _ts(d["at"]) for d in read_decisions(run_dir)
        if d.get("replica") == replica and d["action"] in ("fence", "replace")
        and _ts(d["at"]) >= t0
    ]  # fmt: skip
    ready_at = next(h["at"] for h in reversed(new.history) if h["state"] == "READY")
    time.sleep(1)
    return {
        "fault": how,
        "detect_s": round(min(decided) - t0, 2) if decided else None,
        "replace_s": round(_ts(ready_at) - t0, 2),
        "failed_requests": load.failed - failed_before,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check-interval", type=float, default=1.0)
    p.add_argument("--check-failures", type=int, default=3)
    p.add_argument("--faults", default="scancel,sigkill,sigstop")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-heal-") as tmp:
        site = write_site(Path(tmp), "dev")
        torch.manual_seed(0)
        ModelRepository(site.models_root).save(
            "toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS)
        )
        sf = str(site.source)
        out = json.loads(aimass(
            "serve", "toy", "--site", sf, "--replicas", "2", "--supervise",
            "--check-interval", str(args.check_interval),
            "--check-failures", str(args.check_failures),
            "--wait", "--timeout", "180", "--json",
        ))  # fmt: skip
        run_dir = Path(out["run_dir"])
        load = Load(site.runs_root)
        load.start()
        rows = []
        try:
            for i, how in enumerate(args.faults.split(",")):
                rows.append(measure(run_dir, how.strip(), i % 2, load))
        finally:
            load.stop.set()
            load.join(60)
            subprocess.run([sys.executable, "-m", "aimass_hpc", "serve", "stop", str(run_dir),
                            "--site", sf], capture_output=True)  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"check interval {args.check_interval:g} s, {args.check_failures} failures in a row; "
          f"{load.ok} requests answered in all")  # fmt: skip
    print(f"{'fault':<10}{'detect s':>10}{'replace s':>11}{'failed requests':>17}")
    for r in rows:
        print(f"{r['fault']:<10}{r['detect_s']!s:>10}{r['replace_s']!s:>11}"
              f"{r['failed_requests']!s:>17}")  # fmt: skip


if __name__ == "__main__":
    main()
