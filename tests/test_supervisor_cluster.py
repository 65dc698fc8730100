"""The service supervisor on the real local Slurm cluster (issue 14, healing).

Specification: a service started with ``--supervise`` keeps its replica count under continuous
client load when a replica's job is cancelled (scancel of one array task), when the server
process is SIGKILLed on its node, and when it hangs (SIGSTOP): the supervisor replaces it, a
new replica is READY again, the dead one is never left READY, and no client request fails
beyond the client's retries. ``serve status`` shows the decisions with their reasons;
``serve stop`` stops the supervisor first, then the replicas, and leaves no job behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.launch.serving import read_decisions, read_supervisor
from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import Client, toymodels
from aimass_hpc.serve.endpoints import EndpointRecord, read_records

pytestmark = pytest.mark.cluster

KWARGS: dict[str, Any] = {"in_features": 6, "hidden": 16, "out_features": 3}
X = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)


def aimass(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"aimass {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


class Load:
    """A client predicting continuously; every failure (after the client's retries) is kept."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(
            "toy", runs_root=self.runs, timeout=5, retry_timeout=60, refresh_interval=0.5
        ) as client:
            while not self._stop.is_set():
                try:
                    assert client.predict(X).shape == (4, 3)
                    self.ok += 1
                except Exception as exc:
                    self.failures.append(repr(exc))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(90)

    def wait_for_answers(self, n: int = 20, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        start = self.ok
        while self.ok < start + n:
            assert time.monotonic() < deadline, self.failures[:3]
            time.sleep(0.1)


def ready(run_dir: Path, replica: int) -> EndpointRecord | None:
    for rec in read_records(run_dir):
        if rec.replica == replica and rec.state == "READY":
            return rec
    return None


def wait_replaced(run_dir: Path, victim: EndpointRecord, timeout: float = 120) -> EndpointRecord:
    """The READY successor of ``victim`` (same replica index, another job)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = ready(run_dir, victim.replica)
        if new is not None and new.job_id != victim.job_id:
            return new
        time.sleep(0.3)
    raise AssertionError(f"replica {victim.replica} not replaced: {read_records(run_dir)}")


def test_supervisor_replaces_cancelled_killed_and_hung_replicas_under_load(
    cluster, tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    torch.manual_seed(0)
    ModelRepository(site.models_root).save(
        "toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS)
    )
    sf = str(site.source)
    out = json.loads(
        aimass(
            "serve",
            "toy",
            "--site",
            sf,
            "--replicas",
            "2",
            "--supervise",
            "--check-interval",
            "1",
            "--check-failures",
            "3",
            "--wait",
            "--timeout",
            "180",
            "--json",
        ).stdout  # fmt: skip
    )
    run_dir = Path(out["run_dir"])
    sup_job = str(out["supervisor_job_id"])
    stopped_pids: list[int] = []
    try:
        with Load(site.runs_root) as load:
            load.wait_for_answers()
            for replica, how in ((1, "scancel"), (0, "sigkill"), (1, "sigstop")):
                victim = ready(run_dir, replica)
                assert victim is not None and victim.pid is not None
                if how == "scancel":
                    subprocess.run(["scancel", victim.job_id], check=True)
                elif how == "sigkill":
                    os.kill(victim.pid, signal.SIGKILL)
                else:
                    os.kill(victim.pid, signal.SIGSTOP)
                    stopped_pids.append(victim.pid)
                new = wait_replaced(run_dir, victim)
                old = next(r for r in read_records(run_dir) if r.key == victim.key)
                assert old.state in ("FAILED", "STOPPED", "DRAINING"), (how, old)
                assert new.history[0]["why"] == "submitted by the supervisor"
                load.wait_for_answers()
            assert load.failures == [], load.failures[:3]
            assert load.ok > 60
        actions = [(d["action"], d.get("replica")) for d in read_decisions(run_dir)]
        assert actions.count(("replace", 1)) == 2 and ("replace", 0) in actions
        assert ("fence", 1) in actions  # the hung one: failed its checks, fenced
        hung = [d for d in read_decisions(run_dir) if d["action"] == "fence"]
        assert any("hung" in d["why"] for d in hung)
        status = json.loads(aimass("serve", "status", "toy", "--site", sf, "--json").stdout)
        (doc,) = status
        assert doc["desired_replicas"] == 2 and doc["ready_replicas"] == 2
        assert doc["supervisor"]["state"] == "RUNNING" and doc["supervisor"]["replaced"] == 3
        assert any(d["action"] == "replace" for d in doc["decisions"])
        assert read_supervisor(run_dir)["heartbeat"]  # type: ignore[index]
        rows = json.loads(aimass("endpoints", "toy", "--site", sf, "--all", "--json").stdout)
        fenced = [r for r in rows if r["fenced"]]
        assert fenced and all(r["state"] == "FAILED" for r in fenced)
        assert all(r["history"][-1]["state"] == "FAILED" for r in fenced)
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)
        for pid in stopped_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    scheduler = get_scheduler(site)
    assert scheduler.status([sup_job])[sup_job].is_terminal
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = scheduler.find_jobs_for_run(run_dir)
        statuses = scheduler.status(jobs) if jobs else {}
        if all(s.is_terminal for s in statuses.values()):
            break
        time.sleep(1)
    assert all(s.is_terminal for s in statuses.values()), statuses
    assert not any(r.state == "READY" for r in read_records(run_dir))


def test_autoscaling_follows_a_load_ramp_up_and_back(cluster, tmp_path: Path) -> None:
    """1 -> 3 replicas under load (ongoing requests over the target), back to 1 without."""
    site = write_site(tmp_path, "dev")
    torch.manual_seed(0)
    ModelRepository(site.models_root).save(
        "toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS)
    )
    sf = str(site.source)
    out = json.loads(
        aimass("serve", "toy", "--site", sf, "--min-replicas", "1", "--max-replicas", "3",
               "--target-ongoing", "1", "--upscale-delay", "2", "--downscale-delay", "5",
               "--check-interval", "1", "--wait", "--timeout", "180", "--json").stdout
    )  # fmt: skip
    run_dir = Path(out["run_dir"])
    assert out["replicas"] == 1 and out["supervisor_job_id"]

    def status() -> dict:
        return json.loads(aimass("serve", "status", str(run_dir), "--site", sf, "--json").stdout)[0]

    try:
        bench = subprocess.Popen(
            [sys.executable, "-m", "aimass_hpc", "bench", "toy", "--site", sf, "--concurrency",
             "8", "--duration", "30", "--json"], stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while status()["ready_replicas"] < 3:
            assert time.monotonic() < deadline, status()
            time.sleep(1)
        report = json.loads(bench.communicate(timeout=120)[0])
        assert report["requests_failed"] == 0 and report["requests_ok"] > 0
        deadline = time.monotonic() + 90
        while (doc := status())["ready_replicas"] != 1 or doc["desired_replicas"] != 1:
            assert time.monotonic() < deadline, doc
            time.sleep(1)
        actions = [d["action"] for d in doc["decisions"]]
        assert "scale-up" in actions and "scale-down" in actions
        up = next(d for d in doc["decisions"] if d["action"] == "scale-up")
        assert up["to"] == 3 and "ongoing requests" in up["why"]
    finally:
        aimass("serve", "stop", str(run_dir), "--site", sf, check=False)


def test_upgrade_of_a_supervised_service_moves_the_supervisor(cluster, tmp_path: Path) -> None:
    """Blue/green keeps working: the old supervisor stands down (it replaces none of the
    drained replicas), the new run directory gets its own, serving the new version."""
    site = write_site(tmp_path, "dev")
    repo = ModelRepository(site.models_root)
    for seed in (1, 2):
        torch.manual_seed(seed)
        repo.save("toy", toymodels.mlp(**KWARGS).state_dict(), recipe=toymodels.recipe(**KWARGS))
    repo.promote("toy", 1, "prod")
    sf = str(site.source)
    out = json.loads(
        aimass("serve", "toy@prod", "--site", sf, "--supervise", "--check-interval", "1",
               "--wait", "--timeout", "180", "--json").stdout
    )  # fmt: skip
    old_dir, old_sup = Path(out["run_dir"]), str(out["supervisor_job_id"])
    new_dir = None
    try:
        repo.promote("toy", 2, "prod")
        up = json.loads(aimass("serve", "upgrade", "toy@prod", "--site", sf, "--json").stdout)
        new_dir = Path(up["new_run_dir"])
        assert up["new_version"] == "2"
        new_sup = read_supervisor(new_dir)
        assert new_sup is not None and new_sup["job_id"]
        time.sleep(4)  # a few supervisor rounds: the old one must not bring its replica back
        scheduler = get_scheduler(site)
        assert scheduler.status([old_sup])[old_sup].is_terminal
        assert {r.state for r in read_records(old_dir)} <= {"STOPPED", "DRAINING"}
        assert not any(d["action"] == "replace" for d in read_decisions(old_dir))
        (doc,) = json.loads(aimass("serve", "status", "toy@prod", "--site", sf, "--json").stdout)
        assert doc["run_dir"] == str(new_dir) and doc["ready_replicas"] == 1
        assert doc["supervisor"]["state"] == "RUNNING"
    finally:
        aimass("serve", "stop", "toy", "--site", sf, check=False)
