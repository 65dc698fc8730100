"""What a user sees is what happened: result.json outranks COMPLETED, failures name their rank.

Specification:
- the log parsing (``launch/failure_report.py``) takes the first rank that failed by itself
  from srun's and mpirun's own lines, over peers killed after it (SIGKILL/SIGTERM, 137/143),
  and the end of that rank's own traceback from its labelled lines; the texts below are what
  the real launchers printed on the dev cluster (srun 22.05 ``--label``) and Open MPI 4.1
  (``mpirun --tag-output``);
- a job that ended COMPLETED but whose ``result.json`` says failed (or stopped) is FAILED in
  ``status``/``wait``/``submit --wait`` (text and ``--json``), with the run's one-line reason,
  and ``wait`` exits 1; the outcome is recorded in the run's ``state.json``;
- ``aimass logs JOB --rank N`` prints only rank N's lines;
- a requeueable job whose time limit leaves less than the preemption grace plus a start-up
  margin gets one warning line on stderr at submit time, and is still submitted.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from _sitefixtures import local_site, write_site  # noqa: F401 - fixture

from aimass_hpc.cli import main
from aimass_hpc.common.slurm_states import JobState
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.launch.failure_report import (
    first_failure,
    is_consequence,
    job_outcome,
    last_traceback,
    rank_lines,
    task_ends,
)
from aimass_hpc.launch.runs import RunDir
from aimass_hpc.launch.scheduler import JobStatus
from aimass_hpc.launch.submit import STARTUP_MARGIN_SECONDS, time_limit_warning

# srun --label, 2 nodes x 2 ranks, rank 1 raised KeyError (captured on the dev cluster).
SRUN_LOG = """\
aimass: job 1227 restart 0 on node1 at 2026-12-05T01:28:30+00:00
1: hello from 1
3: hello from 3
0: hello from 0
2: hello from 2
0: Traceback (most recent call last):
0:   File "/x/other.py", line 3, in <module>
0:     noise()
0: RuntimeError: this one is older and not the failure
1: Traceback (most recent call last):
1:   File "/tmp/olab/t.py", line 7, in <module>
1:     d["missing"]
1:     ~^^^^^^^^^^^
1: KeyError: 'missing'
srun: error: node1: task 1: Exited with exit code 1
srun: launch/slurm: _step_signal: Terminating StepId=1227.0
0: slurmstepd-node1: error: *** STEP 1227.0 ON node1 CANCELLED AT 2026-12-05T01:28:37 ***
srun: error: node1: task 0: Terminated
srun: error: node2: tasks 2-3: Terminated
srun: Force Terminated StepId=1227.0
"""

# Peers killed first in the report (SIGKILL -> 137) before the real failure's line.
SRUN_KILLED_FIRST = """\
2: Traceback (most recent call last):
2:   File "train.py", line 9, in <module>
2:     batch = table[key]
2: KeyError: 'labels'
srun: error: node2: tasks 0,3: Exited with exit code 137
srun: error: node2: task 2: Exited with exit code 1
srun: error: node1: task 1: Killed
"""

# mpirun --tag-output (Open MPI 4.1.4), rank 1 raised KeyError.
MPIRUN_LOG = """\
[1,1]<stdout>:hello from 1[1,1]<stdout>:
[1,0]<stdout>:hello from 0[1,0]<stdout>:
[1,2]<stdout>:hello from 2
[1,1]<stderr>:Traceback (most recent call last):
[1,1]<stderr>:  File "/tmp/olab/m.py", line 6, in <module>
[1,1]<stderr>:    {}["missing"]
[1,1]<stderr>:    ~~^^^^^^^^^^^
[1,1]<stderr>:KeyError: 'missing'
--------------------------------------------------------------------------
Primary job  terminated normally, but 1 process returned
a non-zero exit code. Per user-direction, the job has been aborted.
--------------------------------------------------------------------------
--------------------------------------------------------------------------
mpirun detected that one or more processes exited with non-zero status, thus causing
the job to be terminated. The first process to do so was:

  Process name: [[3108,1],1]
  Exit code:    1
--------------------------------------------------------------------------
"""


def test_srun_log_names_the_first_failing_rank_and_its_error() -> None:
    failure = first_failure(SRUN_LOG)
    assert failure is not None
    assert (failure.rank, failure.exit_code, failure.node) == (1, 1, "node1")
    assert failure.error == "KeyError: 'missing'"
    assert failure.traceback[-1] == "KeyError: 'missing'"
    assert failure.traceback[0].startswith("Traceback") or "File" in failure.traceback[0]
    assert all("RuntimeError" not in line for line in failure.traceback)  # rank 0's is not it
    assert failure.summary() == "rank 1 exited 1: KeyError: 'missing'"


def test_killed_peers_never_outrank_the_rank_that_failed_by_itself() -> None:
    ends = task_ends(SRUN_KILLED_FIRST)
    assert [(e.rank, e.exit_code, e.killed) for e in ends] == [
        (0, 137, True),
        (3, 137, True),
        (2, 1, False),
        (1, None, True),
    ]
    failure = first_failure(SRUN_KILLED_FIRST)
    assert failure is not None and failure.rank == 2 and failure.error == "KeyError: 'labels'"


# The dev cluster's real case: the peers' gloo barrier fails too, every rank exits 1 and srun
# reports them together; here a peer's traceback even reaches the log first.
SRUN_ALL_EXIT_1 = """\
0: aimass: rank 0 failed:
0: Traceback (most recent call last):
0:   File "user_script.py", line 11, in <module>
0:     dist.barrier()
0: RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50845: Connection \
reset by peer. This is typically caused by a remote worker hanging
1: aimass: rank 1 failed:
1: Traceback (most recent call last):
1:   File "user_script.py", line 10, in <module>
1:     config["batch_size"]
1: KeyError: 'batch_size'
srun: error: node1: tasks 0-1: Exited with exit code 1
srun: error: node2: tasks 2-3: Exited with exit code 1
"""


def test_a_peer_that_lost_its_connection_is_not_the_failure() -> None:
    failure = first_failure(SRUN_ALL_EXIT_1)
    assert failure is not None and (failure.rank, failure.exit_code) == (1, 1)
    assert failure.error == "KeyError: 'batch_size'"
    assert is_consequence("RuntimeError: [...] Connection closed by peer [127.0.0.1]:41188.")
    assert not is_consequence("KeyError: 'batch_size'")


def test_only_killed_ranks_still_name_the_first() -> None:
    failure = first_failure("srun: error: node1: task 3: Killed\n")
    assert failure is not None and failure.rank == 3 and failure.exit_code is None
    assert failure.summary() == "rank 3 killed"


def test_mpirun_tagged_output() -> None:
    failure = first_failure(MPIRUN_LOG)
    assert failure is not None and (failure.rank, failure.exit_code) == (1, 1)
    assert failure.error == "KeyError: 'missing'"
    assert rank_lines(MPIRUN_LOG, 2) == ["hello from 2"]


def test_unlabelled_runtime_failure_line() -> None:
    text = (
        "aimass: rank 3 failed:\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nValueError: bad\nnoise after\n'
    )
    failure = first_failure(text)
    assert failure is not None and failure.rank == 3 and failure.error == "ValueError: bad"


def test_no_failure_in_a_clean_log() -> None:
    assert first_failure("aimass: job 1 restart 0\n0: fine\n1: fine\n") is None
    assert last_traceback(["no traceback here"]) == ("", [])


def test_rank_lines_strip_labels_and_keep_order() -> None:
    assert rank_lines(SRUN_LOG, 2) == ["hello from 2"]
    assert rank_lines(SRUN_LOG, 1)[0] == "hello from 1"
    assert rank_lines(SRUN_LOG, 7) == []


# ------------------------------------------------------------------ outcome of a run dir


def _run(tmp_path, result: dict | None, log: str = "") -> RunDir:
    run = RunDir.create(tmp_path / "runs", "t")
    run.update_state(job_id="5", name="t")
    if result is not None:
        (run.path / "result.json").write_text(json.dumps(result))
    (run.logs_dir / "restart-0.log").write_text(log)
    return run


def _status(state: JobState, restarts: int = 0) -> JobStatus:
    return JobStatus("5", "t", state, exit_code=0, restart_count=restarts, source="sacct")


def test_result_json_outranks_completed(tmp_path) -> None:
    reason = "restart limit reached, 3 of 3, last step 3 of 300"
    run = _run(tmp_path, {"status": "failed", "reason": reason, "restart": 3})
    outcome = job_outcome(_status(JobState.COMPLETED, 3), run)
    assert (outcome.state, outcome.reason, outcome.ok) == ("FAILED", reason, False)
    assert outcome.scheduler_state == "COMPLETED" and outcome.result_status == "failed"
    # An old file without a reason still fails, with a plain one.
    old = _run(tmp_path, {"status": "stopped"})
    outcome = job_outcome(_status(JobState.COMPLETED), old)
    assert outcome.state == "FAILED" and "stopped" in outcome.reason
    # A result of an earlier restart does not speak for the latest attempt.
    stale = _run(tmp_path, {"status": "requeued", "restart": 0})
    assert job_outcome(_status(JobState.COMPLETED, 1), stale).ok
    # Completed is completed; a running job is what the scheduler says.
    assert job_outcome(_status(JobState.COMPLETED), _run(tmp_path, {"status": "completed"})).ok
    running = job_outcome(_status(JobState.RUNNING), _run(tmp_path, {"status": "failed"}))
    assert running.state == "RUNNING"


def test_a_failed_job_names_its_rank(tmp_path) -> None:
    run = _run(tmp_path, None, SRUN_LOG)
    outcome = job_outcome(_status(JobState.FAILED), run)
    assert outcome.state == "FAILED"
    assert outcome.reason == "rank 1 exited 1: KeyError: 'missing'"
    assert outcome.failure is not None and outcome.failure.to_dict()["rank"] == 1


# ------------------------------------------------------------------ the CLI (local backend)


def run_cli(capsys, *argv: str) -> tuple[Any, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


WRITES_FAILED = (
    "import json, os; "
    "open(os.environ['AIMASS_RUN_DIR'] + '/result.json', 'w').write(json.dumps("
    "{'status': 'failed', 'reason': 'restart limit reached, 3 of 3, last step 3 of 300'}))"
)


def test_status_wait_and_submit_wait_show_failed_for_a_failed_result(
    capsys,
    local_site,  # noqa: F811
    tmp_path,
    monkeypatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # the table's reason cell on one line
    spec = tmp_path / "job.toml"
    spec.write_text(
        '[job]\nname = "says failed"\n'
        f"command = [{json.dumps('python3')}, '-c', {json.dumps(WRITES_FAILED)}]\n"
    )
    site = local_site.source or ""
    code, out, _ = run_cli(capsys, "submit", "--site", site, str(spec), "--wait", "--json")
    assert code == 1
    shown = json.loads(out)["status"]
    assert shown["state"] == "FAILED" and shown["scheduler_state"] == "COMPLETED"
    assert shown["reason"] == "restart limit reached, 3 of 3, last step 3 of 300"
    job_id = json.loads(out)["job_id"]
    code, out, _ = run_cli(capsys, "wait", "--site", site, job_id)
    assert code == 1 and "FAILED" in out and "restart limit reached" in out
    assert "COMPLETED" not in out
    code, out, _ = run_cli(capsys, "status", "--site", site, job_id, "--json")
    (row,) = json.loads(out)
    assert row["state"] == "FAILED" and row["ok"] is False and row["result_status"] == "failed"
    run = RunDir(__import__("pathlib").Path(row["run_dir"]))
    recorded = run.read_state()["outcome"]
    assert recorded["state"] == "FAILED" and recorded["scheduler_state"] == "COMPLETED"


def test_logs_rank_shows_only_that_rank(capsys, local_site, tmp_path) -> None:  # noqa: F811
    spec = tmp_path / "job.toml"
    # A job printing labelled lines the way srun --label does (the local backend has no srun).
    spec.write_text(
        '[job]\nname = "labels"\n'
        "command = ['bash', '-c', 'printf \"0: zero\\\\n1: one\\\\n0: again\\\\n\"']\n"
    )
    site = local_site.source or ""
    code, out, _ = run_cli(capsys, "submit", "--site", site, str(spec), "--wait", "--json")
    assert code == 0, out
    job_id = json.loads(out)["job_id"]
    code, out, _ = run_cli(capsys, "logs", "--site", site, job_id, "--rank", "0")
    assert code == 0 and out == "zero\nagain\n"
    code, out, _ = run_cli(capsys, "logs", "--site", site, job_id, "--rank", "1", "-f")
    assert code == 0 and out == "one\n"
    code, _, err = run_cli(capsys, "logs", "--site", site, job_id, "--rank", "5")
    assert code == 3 and "no lines from rank 5" in err
    code, _, err = run_cli(capsys, "logs", "--site", site, job_id, "--rank", "0", "--batch")
    assert code == 2 and err.count("\n") == 1


def test_a_short_time_limit_warns_once_at_submit(tmp_path) -> None:
    site = write_site(tmp_path, "dev", preemption={"signal": "USR1", "grace_seconds": 120})
    short = JobRequest(name="short", command=["true"], time="00:02:00").resolve(site)
    message = time_limit_warning(site, short)
    assert message is not None and "120 s" in message and f"{STARTUP_MARGIN_SECONDS} s" in message
    enough = JobRequest(name="ok", command=["true"], time="00:03:00").resolve(site)
    assert time_limit_warning(site, enough) is None
    unsignalled = JobRequest(name="x", command=["true"], time="00:01:00", signal=False)
    assert time_limit_warning(site, unsignalled.resolve(site)) is None


def test_submit_warns_on_stderr_and_still_submits(capsys, tmp_path) -> None:
    site = write_site(tmp_path, "dev", preemption={"signal": "USR1", "grace_seconds": 120})
    spec = tmp_path / "job.toml"
    spec.write_text('[job]\nname = "short job"\ncommand = ["true"]\ntime = "00:01:30"\n')
    code, out, err = run_cli(capsys, "submit", "--site", site.source or "", str(spec), "--dry-run")
    assert code in (0, None) and "#!/bin/bash" in out
    (line,) = [x for x in err.splitlines() if x.startswith("aimass: warning:")]
    assert "time limit 00:01:30" in line and "preemption.grace_seconds (120 s)" in line
