"""The service supervisor's files and commands, without a cluster (issue 14, healing).

Specification: every replica record keeps its state history ({state, at, why}); a record the
supervisor fenced stays FAILED whatever the replica writes later; the desired state, the
decisions log (append-only) and ``aimass serve status`` show what the supervisor wants and
did; the supervisor's job script quotes a hostile run directory; a handover does not submit a
replacement once ``serve stop`` has begun; the supervisor entry point refuses a directory that
is no service in one line.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _sitefixtures import write_site

from aimass_hpc.launch import serving as S
from aimass_hpc.launch.service_supervisor import Settings, Supervisor, main
from aimass_hpc.serve.endpoints import (
    STOP_MARKER,
    EndpointRecord,
    EndpointState,
    read_records,
    stop_requested,
    write_record,
)


def _record(run_dir: Path, job: str = "7_0", replica: int = 0) -> EndpointRecord:
    return EndpointRecord(
        model_ref="toy", model_name="toy", version="1", state=EndpointState.PENDING,
        job_id=job, replica=replica, run_dir=str(run_dir),
    )  # fmt: skip


def aimass(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "300"}  # rich tables: no column cut short
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=120, env=env,
    )  # fmt: skip


def test_history_records_every_state_change_with_its_reason(tmp_path: Path) -> None:
    rec = _record(tmp_path)
    write_record(rec, message="submitted")
    write_record(rec, EndpointState.LOADING, host="127.0.0.1", port=1234)
    write_record(rec, EndpointState.LOADING, pid=5)  # same state: no new entry
    write_record(rec, EndpointState.READY)
    (back,) = read_records(tmp_path)
    assert [h["state"] for h in back.history] == ["PENDING", "LOADING", "READY"]
    assert back.history[0]["why"] == "submitted"
    assert all(h["at"] for h in back.history)


def test_a_fenced_record_stays_failed_whatever_the_replica_writes(tmp_path: Path) -> None:
    replica_copy = _record(tmp_path)
    write_record(replica_copy, EndpointState.LOADING)
    supervisor_copy = read_records(tmp_path)[0]
    write_record(supervisor_copy, EndpointState.FAILED, fenced="supervisor: hung", message="hung")
    # The replica wakes up (SIGCONT) and believes it is READY: the fence wins.
    write_record(replica_copy, EndpointState.READY)
    (back,) = read_records(tmp_path)
    assert back.state == "FAILED" and back.fenced == "supervisor: hung"
    assert [h["state"] for h in back.history] == ["LOADING", "FAILED"]


def test_desired_state_decisions_and_status(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    run_dir = tmp_path / "svc"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text("{}")
    opts = S.ServeOptions(ref="toy@prod", replicas=2, check_interval_s=0.5, check_failures=2)
    doc = S.write_desired(run_dir, opts)
    assert S.read_desired(run_dir) == doc
    settings = Settings.from_desired(doc)
    assert (settings.interval_s, settings.failures) == (0.5, 2)
    assert Settings.from_desired({"supervisor": {"failures": "x"}}).failures == 3
    S.record_decision(run_dir, "replace", "replica 1 has no live job", replica=1)
    S.record_decision(run_dir, "fence", "hung", replica=0)
    assert [d["action"] for d in S.read_decisions(run_dir)] == ["replace", "fence"]
    assert [d["action"] for d in S.read_decisions(run_dir, 1)] == ["fence"]
    write_record(_record(run_dir, "local-1", 0), EndpointState.READY)
    status = S.service_status(site, run_dir)
    assert status["desired_replicas"] == 2 and status["model"] == "toy@prod"
    assert status["decisions"][-1]["why"] == "hung" and status["supervisor"] is None
    S.mark_stopping(run_dir)
    assert stop_requested(run_dir) and S.read_desired(run_dir)["state"] == "stopped"  # type: ignore[index]
    out = aimass("serve", "status", str(run_dir), "--site", str(site.source), "--json")
    assert out.returncode == 0, out.stderr
    (shown,) = json.loads(out.stdout)
    assert shown["stopping"] and shown["desired_state"] == "stopped"
    assert shown["replicas"][0]["history"][-1]["state"] == "READY"
    text = aimass("serve", "status", str(run_dir), "--site", str(site.source))
    assert "desired: 2 replica(s), stopped (stopping)" in text.stdout
    assert "none (start with --supervise)" in text.stdout
    missing = aimass("serve", "status", "nosuch", "--site", str(site.source))
    assert missing.returncode == 3 and "no service for 'nosuch'" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_endpoints_json_shows_the_full_history(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    run_dir = site.runs_root / "svc"
    rec = _record(run_dir, "local-9", 0)
    for state in ("PENDING", "LOADING", "READY"):
        write_record(rec, state, message=f"now {state}")
    rows = json.loads(
        aimass("endpoints", "--site", str(site.source), "--json", "--no-probe").stdout
    )
    assert [h["state"] for h in rows[0]["history"]] == ["PENDING", "LOADING", "READY"]
    table = aimass("endpoints", "--site", str(site.source), "--no-probe")
    assert "PENDING>LOADING>READY (now READY)" in table.stdout


def test_supervisor_job_script_quotes_a_hostile_run_dir(tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    evil = tmp_path / "svc $(touch pwned) `id`; x"
    evil.mkdir()
    opts = S.ServeOptions(ref="toy")
    sub = S.submit(
        site, S.supervisor_request(site, evil, opts), dry_run=True, runs_root=tmp_path / "sup"
    )
    assert "aimass_hpc.launch.service_supervisor" in sub.script
    assert "'" + str(evil) + "'" in sub.script  # one single-quoted word, byte for byte
    check = subprocess.run(["bash", "-n"], input=sub.script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr


def test_supervisor_entry_refuses_a_directory_that_is_no_service(tmp_path: Path, capsys) -> None:
    site = write_site(tmp_path, "local")
    code = main([str(tmp_path), "--site", str(site.source)])
    err = capsys.readouterr().err
    assert code == 3 and "not a service run directory" in err and "Traceback" not in err
    helped = subprocess.run(
        [sys.executable, "-m", "aimass_hpc.launch.service_supervisor", "--help"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert helped.returncode == 0 and "desired.json" in helped.stdout


def test_supervisor_does_nothing_once_stop_began(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    run_dir = tmp_path / "svc"
    run_dir.mkdir()
    S.write_desired(run_dir, S.ServeOptions(ref="toy", replicas=3))
    (run_dir / STOP_MARKER).write_text("now\n")
    sup = Supervisor(site, run_dir)
    assert sup.tick() == []  # no replica record and 3 wanted, yet nothing is submitted
    assert sup.run(max_rounds=5) == 0
    assert [d["action"] for d in S.read_decisions(run_dir)] == ["supervisor-up", "supervisor-exit"]


def test_check_names_why_a_replica_fails(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    sup = Supervisor(site, tmp_path)
    rec = _record(tmp_path)
    assert sup.check(rec, 1.0) == "READY without an address"
    rec.host, rec.port = "127.0.0.1", 9  # discard port: nothing listens
    problem = sup.check(rec, 1.0)
    assert problem is not None and "ConnectError" in problem


def test_handover_submits_nothing_once_stop_began(tmp_path: Path) -> None:
    from aimass_hpc.serve.handover import handover_on_warning
    from aimass_hpc.serve.server import Replica, ReplicaOptions

    run_dir = tmp_path / "svc"
    run_dir.mkdir()
    (run_dir / STOP_MARKER).write_text("now\n")
    replica = Replica(
        ReplicaOptions(run_dir=run_dir, model_ref="toy", job_id="5_0", replica=0),
        loader=lambda: pytest.fail("no model is loaded"),
    )
    write_record(replica.record, EndpointState.READY)
    asyncio.run(handover_on_warning(replica))
    (only,) = read_records(run_dir)  # no PENDING successor was written
    assert only.job_id == "5_0" and only.message is None  # no sbatch tried, none failed


def test_autoscale_bounds_are_checked_in_one_line(tmp_path: Path) -> None:
    site = write_site(tmp_path, "local")
    bad = aimass("serve", "toy", "--site", str(site.source), "--min-replicas", "3",
                 "--max-replicas", "2", "--dry-run")  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--max-replicas 2: below --min-replicas 3" in bad.stderr
