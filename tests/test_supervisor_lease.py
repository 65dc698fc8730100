"""The supervisor's lease (issue 14): at most one supervisor acts for a service.

Specification: of two contenders exactly one holds the lease (also when they race for it at
once); the holder renews it each round; a lease is taken over when released (a clean exit, a
requeue), when it expired, or when its holder is gone (its process ended, or it was an earlier
run of the same Slurm job); a supervisor without the lease waits on standby, says so once in
the decisions (naming the holder), acts nothing, and takes over when the lease is free; every
decision names the supervisor that made it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from _sitefixtures import write_site

from aimass_hpc.launch import serving as S
from aimass_hpc.launch.service_supervisor import Lease, Supervisor, lease_ttl, who_am_i


class Clock:
    """A settable clock (seconds) for expiries."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def me(ident: str, *, pid: int | None = None, job: str | None = None, restart: int = 0) -> dict:
    return {
        "ident": ident, "job_id": job, "restart": restart, "host": socket.gethostname(),
        "pid": os.getpid() if pid is None else pid,
    }  # fmt: skip


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_two_contenders_one_holder_renewal_and_release(tmp_path: Path) -> None:
    clock = Clock()
    a = Lease(tmp_path, me("A"), ttl_s=60, clock=clock)
    b = Lease(tmp_path, me("B"), ttl_s=60, clock=clock)
    held, doc = a.acquire()
    assert held and doc is not None and doc["ident"] == "A" and doc["generation"] == 1
    held, doc = b.acquire()
    assert not held and doc is not None and doc["ident"] == "A"  # B waits, knowing who holds
    clock.now += 40  # within the TTL: A renews (in place, same generation)
    held, doc = a.acquire()
    assert held and doc is not None and doc["expires"] == clock.now + 60 and doc["generation"] == 1
    clock.now += 40  # 80 s after taking it, 40 after renewing: still A's
    assert b.acquire()[0] is False
    a.release()
    held, doc = b.acquire()
    assert held and doc is not None and doc["took_over"] == "A" and "released by A" in doc["why"]
    assert doc["generation"] == 2
    held, doc = a.acquire()
    assert not held and doc is not None and doc["ident"] == "B"


def test_an_expired_lease_is_taken_over_and_its_old_holder_stands_down(tmp_path: Path) -> None:
    clock = Clock()
    a = Lease(tmp_path, me("A"), ttl_s=60, clock=clock)
    b = Lease(tmp_path, me("B"), ttl_s=60, clock=clock)
    assert a.acquire()[0]
    clock.now += 59
    assert not b.acquire()[0]
    clock.now += 2  # A did not renew for 61 s (a hung round, a frozen node)
    held, doc = b.acquire()
    assert held and doc is not None and doc["why"] == "A let it expire"
    held, doc = a.acquire()  # A wakes up: the lease is B's now
    assert not held and doc is not None and doc["ident"] == "B"
    a.release()  # releases nothing of B's
    assert b.acquire()[0]


def test_a_holder_that_is_gone_loses_the_lease_at_once(tmp_path: Path) -> None:
    clock = Clock()
    gone = Lease(tmp_path, me("ghost", pid=dead_pid()), ttl_s=600, clock=clock)
    assert gone.acquire()[0]
    held, doc = Lease(tmp_path, me("B"), ttl_s=600, clock=clock).acquire()
    assert held and doc is not None and "ghost is gone (process" in doc["why"]
    # The requeued run of a Slurm job follows its earlier run at once (Slurm runs one at a
    # time), without asking the scheduler; a different live job is not taken over.
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    first = Lease(run_dir, me("77", job="77"), ttl_s=600, clock=clock)
    assert first.acquire()[0]
    held, doc = Lease(run_dir, me("77/r1", job="77", restart=1), ttl_s=600, clock=clock).acquire()
    assert held and doc is not None and "an earlier run of this job" in doc["why"]
    assert not Lease(run_dir, me("77/r1 twin", job="77", restart=1), clock=clock).acquire()[0]


def test_contenders_racing_for_a_free_lease_yield_one_holder(tmp_path: Path) -> None:
    leases = [Lease(tmp_path, me(f"L{i}"), ttl_s=60) for i in range(8)]
    results: list[bool] = []
    gate = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        gate.wait()
        results.append(lease.acquire()[0])

    threads = [threading.Thread(target=contend, args=(x,)) for x in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [False] * 7 + [True]
    (winner,) = [x for x in leases if x.generation is not None]
    assert Lease(tmp_path, me("late")).current()[1]["ident"] == winner.me["ident"]  # type: ignore[index]


def test_identity_and_ttl() -> None:
    mine = who_am_i({"SLURM_JOB_ID": "42", "SLURM_RESTART_COUNT": "2"})
    assert mine["ident"] == "42/r2" and mine["job_id"] == "42" and mine["restart"] == 2
    assert who_am_i({"SLURM_JOB_ID": "42"})["ident"] == "42"
    assert who_am_i({})["ident"] == f"{socket.gethostname()}:{os.getpid()}"
    assert lease_ttl(1.0) == 60.0 and lease_ttl(30.0) == 150.0


def test_a_supervisor_without_the_lease_waits_on_standby(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    run_dir = tmp_path / "svc"
    run_dir.mkdir()
    S.write_desired(run_dir, S.ServeOptions(ref="toy", replicas=0, check_interval_s=0.1))
    other = Lease(run_dir, me("other-supervisor"), ttl_s=600)
    assert other.acquire()[0]
    sup = Supervisor(site, run_dir)
    assert sup.run(max_rounds=3) == 0
    decisions = S.read_decisions(run_dir)
    assert [d["action"] for d in decisions] == ["supervisor-up", "standby"]
    assert decisions[1]["why"] == "supervisor other-supervisor holds the lease"
    assert all(d["supervisor"] == sup.me["ident"] for d in decisions)
    assert S.read_supervisor(run_dir) is None  # a standby writes no heartbeat
    other.release()
    sup = Supervisor(site, run_dir)
    assert sup.run(max_rounds=1) == 0
    last: dict[str, Any] = S.read_decisions(run_dir)[-1]
    assert last["action"] == "lease-acquired" and last["took_over"] == "other-supervisor"
    assert "released by other-supervisor" in last["why"]
    assert S.read_supervisor(run_dir)["holder"] == sup.me["ident"]  # type: ignore[index]
    # It released the lease on its way out: the next one takes it at once.
    assert Lease(run_dir, me("next"), ttl_s=600).acquire()[0]


def test_the_warning_signal_hands_the_lease_over_and_requeues_the_job(tmp_path: Path) -> None:
    """The site's warning signal (USR1) ends a round: the lease is released, then the job is
    requeued (here a local-scheduler job id nobody knows: the failure is a decision too)."""
    import json
    import signal
    import time

    site = write_site(tmp_path, "local")
    run_dir = tmp_path / "svc"
    run_dir.mkdir()
    (run_dir / "job.sh").write_text("#!/bin/bash\n")
    S.write_desired(run_dir, S.ServeOptions(ref="toy", replicas=0, check_interval_s=0.2))
    env = {**os.environ, "SLURM_JOB_ID": "local-424242", "SLURM_RESTART_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimass_hpc.launch.service_supervisor", str(run_dir),
         "--site", str(site.source)], env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not any(d["action"] == "lease-acquired" for d in S.read_decisions(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    actions = [(d["action"], d["supervisor"]) for d in S.read_decisions(run_dir)]
    assert actions[:3] == [
        ("supervisor-up", "local-424242/r3"),
        ("lease-acquired", "local-424242/r3"),
        ("supervisor-requeued", "local-424242/r3"),
    ]
    requeued = S.read_decisions(run_dir)[2]
    assert "signal SIGUSR1" in requeued["why"] and requeued["job_id"] == "local-424242"
    lease = json.loads((run_dir / "supervisor.lease.1").read_text())
    assert lease["released"] and lease["ident"] == "local-424242/r3"
    # The next run of the job (restart 4) takes the lease at once.
    held, doc = Lease(run_dir, me("local-424242/r4", job="local-424242", restart=4)).acquire()
    assert held and doc is not None and doc["took_over"] == "local-424242/r3"
