"""Scheduler faults on the real local cluster: no silent wrong result, no duplicate job.

The faults come from wrappers around the real Slurm commands, put first on ``PATH`` (never a
mock: every call still reaches the real daemons unless a fault is switched on):

* ``squeue`` hides the job ids listed in ``hide`` (as if ``MinJobAge`` had passed);
* ``sacct`` fails with slurmdbd's error while ``sacct-down`` exists;
* ``sbatch`` queues the job and then hangs past the timeout while ``sbatch-slow`` exists, or
  hangs without queueing anything while ``sbatch-lost`` exists. Every call is logged.

The daemons themselves are never stopped (other tests share the cluster).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sitefixtures import write_site
from test_search_driver import executions, write_spec

from aimass_hpc.common.errors import NotFoundError, SchedulerError
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.scheduler import (
    AccountingUnavailable,
    CommandTimeout,
    JobState,
    get_scheduler,
)
from aimass_hpc.launch.search_driver import SearchDir
from aimass_hpc.launch.submit import submit

pytestmark = pytest.mark.cluster

TRIAL_TIME = '[trial]\ntime = "00:03:00"\n'
SACCT_ERROR = (
    "sacct: error: slurm_persist_conn_open_without_init: failed to open persistent connection "
    "to host:127.0.0.1:6819: Connection refused\n"
    "sacct: error: Problem talking to the database: Connection refused"
)


class Faults:
    """A directory of wrapper commands and the switches that turn their faults on."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        self.calls = root / "sbatch-calls"
        for name in ("squeue", "sacct", "sbatch"):
            real = shutil.which(name)
            assert real is not None, f"{name} is not installed"
            path = self.bin / name
            path.write_text(getattr(self, f"_{name}_script")(shlex.quote(real)))
            path.chmod(0o755)

    def _squeue_script(self, real: str) -> str:
        hide = shlex.quote(str(self.dir / "hide"))
        return f"""#!/bin/bash
# squeue, minus the job ids listed in {hide} (their MinJobAge has passed)
out=$(mktemp) || exit 1
trap 'rm -f "$out"' EXIT
{real} "$@" >"$out"
rc=$?
if [ $rc -ne 0 ] || [ ! -s {hide} ]; then cat "$out"; exit $rc; fi
awk -F'|' 'NR == FNR {{ hidden[$1] = 1; next }}
  {{ id = $1; gsub(/ /, "", id); split(id, base, "_")
     if (!(id in hidden) && !(base[1] in hidden)) print }}' {hide} "$out"
"""

    def _sacct_script(self, real: str) -> str:
        down = shlex.quote(str(self.dir / "sacct-down"))
        return f"""#!/bin/bash
# sacct, or slurmdbd's error while {down} exists
if [ -e {down} ]; then
  printf '%s\\n' {shlex.quote(SACCT_ERROR)} >&2
  exit 1
fi
exec {real} "$@"
"""

    def _sbatch_script(self, real: str) -> str:
        slow = shlex.quote(str(self.dir / "sbatch-slow"))
        lost = shlex.quote(str(self.dir / "sbatch-lost"))
        calls = shlex.quote(str(self.calls))
        return f"""#!/bin/bash
# sbatch; with {slow}: queue, then hang; with {lost}: hang without queueing
echo "$*" >>{calls}
if [ -e {lost} ]; then exec sleep 60; fi
if [ -e {slow} ]; then {real} "$@" >/dev/null; exec sleep 60; fi
exec {real} "$@"
"""

    # ---------------------------------------------------------------- switches

    def hide(self, job_ids: list[str]) -> None:
        (self.dir / "hide").write_text("".join(f"{j}\n" for j in job_ids))

    def sacct_down(self, down: bool = True) -> None:
        flag = self.dir / "sacct-down"
        if down:
            flag.touch()
        else:
            flag.unlink(missing_ok=True)

    def sbatch(self, mode: str) -> None:
        """``"slow"``, ``"lost"`` or ``"ok"``."""
        for name in ("slow", "lost"):
            (self.dir / f"sbatch-{name}").unlink(missing_ok=True)
        if mode != "ok":
            (self.dir / f"sbatch-{mode}").touch()

    def sbatch_calls(self) -> int:
        return len(self.calls.read_text().splitlines()) if self.calls.exists() else 0

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment with the wrappers first on PATH."""
        return {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", **extra}


@pytest.fixture
def faults(cluster, tmp_path: Path) -> Faults:
    return Faults(tmp_path / "faults")


def aimass(faults: Faults, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=faults.env(**env),
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _records(search_dir: Path) -> list[dict]:
    return J.Journal(search_dir / J.JOURNAL_NAME).records()


def _submitted(search_dir: Path) -> list[dict]:
    return [r for r in _records(search_dir) if r["type"] == J.TRIAL_SUBMITTED]


# ---------------------------------------------------------------------------------------------
# Item: finished trials, forgotten by squeue, while accounting is down


def _start_search_and_kill_the_driver(faults: Faults, tmp_path: Path, site) -> Path:
    """Three trials queued by a driver that is then killed; returns the search directory."""
    spec_path = write_spec(
        tmp_path,
        budget=3,
        parallel=3,
        env={"OBJ_SLEEP": "4", "OBJ_REPORT_TRIALS": "0"},
        extra=TRIAL_TIME,
    )
    search_dir = tmp_path / "search"
    with open(tmp_path / "driver-1.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aimass_hpc", "search", str(spec_path)]
            + ["--site", str(site.source), "--dir", str(search_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=faults.env(),
        )
    try:
        _wait_for(lambda: len(_submitted(search_dir)) == 3, 120, "three trial submissions")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return search_dir


def test_finished_trials_are_not_rerun_when_squeue_forgot_them_and_sacct_fails(
    faults: Faults, tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    search_dir = _start_search_and_kill_the_driver(faults, tmp_path, site)
    before = SearchDir.open(search_dir).state()
    jobs = [before.trials[i].job_id for i in range(3)]
    assert all(jobs) and not before.finished
    final = get_scheduler(site).wait(jobs, timeout=120)  # the trials finish, no driver around
    assert {st.state.value for st in final.values()} == {"COMPLETED"}
    assert faults.sbatch_calls() == 3
    # Trial 0 wrote result.json; trial 1 only printed its value, but its job script left an
    # exit record; trial 2's node "died" before the script could write one.
    exit_records = sorted((Path(before.trials[2].run_dir) / "logs").glob("exit-*.json"))
    assert len(exit_records) == 1 and '"exit_code": 0' in exit_records[0].read_text()
    exit_records[0].unlink()

    # MinJobAge passes (squeue forgets them) while slurmdbd is down
    faults.hide(jobs)
    faults.sacct_down()
    for command in ("status", "wait"):
        out = aimass(faults, command, "--site", str(site.source), jobs[2])
        assert out.returncode == 5, (command, out.returncode, out.stdout, out.stderr)
        (line,) = out.stderr.strip().splitlines()
        assert line.startswith("aimass: error: cannot tell what became of job(s) " + jobs[2])
        assert "sacct failed" in line and "Traceback" not in out.stderr
    cancel = aimass(faults, "cancel", "--site", str(site.source), jobs[2])
    assert cancel.returncode == 5, cancel.stderr

    log_path = tmp_path / "driver-2.log"
    with open(log_path, "w") as log:
        resume = subprocess.Popen(
            [sys.executable, "-m", "aimass_hpc", "search", "resume", str(search_dir), "--json"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=faults.env(),
        )
    try:
        _wait_for(
            lambda: "waiting for the scheduler" in log_path.read_text(), 60, "the waiting message"
        )
        time.sleep(3)  # many polls (0.2 s apart): well past the three misses that meant "lost"
        text = log_path.read_text()
        assert faults.sbatch_calls() == 3, text  # nothing resubmitted
        assert not any(r["type"] == J.TRIAL_LOST for r in _records(search_dir)), text
        waiting = [ln for ln in text.splitlines() if "waiting for the scheduler" in ln]
        assert len(waiting) == 1, text  # said once, not every poll
        assert f"trial 2: job {jobs[2]} has left the queue" in waiting[0]
        assert "sacct failed" in waiting[0]
        # trial 0's result.json and trial 1's exit record outrank the silent scheduler
        state = SearchDir.open(search_dir).state()
        assert state.trials[0].state == state.trials[1].state == J.FINISHED
        assert state.trials[2].state in (J.SUBMITTED, J.RUNNING)

        faults.sacct_down(False)  # slurmdbd is back: accounting says how trial 2 ended
        out, _ = resume.communicate(timeout=120)
    finally:
        if resume.poll() is None:
            resume.kill()
            resume.wait()
    assert resume.returncode == 0, log_path.read_text()
    summary = json.loads(out)
    assert summary["counts"] == {"finished": 3}
    assert [t["attempts"] for t in summary["trials"]] == [1, 1, 1]
    assert [t["job_id"] for t in summary["trials"]] == jobs
    assert faults.sbatch_calls() == 3
    starts = sorted(e["trial"] for e in executions(tmp_path) if e["event"] == "start")
    assert starts == [0, 1, 2]  # every trial ran exactly once


def test_status_of_an_id_nobody_knows_is_still_not_found(faults: Faults, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    out = aimass(faults, "status", "--site", str(site.source), "999991")
    assert out.returncode == 3, out.stderr
    assert out.stderr.strip() == "aimass: error: unknown job id(s): 999991"


def test_the_scheduler_api_never_calls_an_unanswerable_job_unknown(
    faults: Faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = write_site(tmp_path, "dev")
    sub = submit(site, JobRequest(name="gone", command=["true"], time="2"))
    sched = get_scheduler(site)
    assert sched.wait([sub.job_id], timeout=120)[sub.job_id].state is JobState.COMPLETED
    faults.hide([sub.job_id])
    faults.sacct_down()
    monkeypatch.setenv("PATH", faults.env()["PATH"])

    st = sched.status([sub.job_id])[sub.job_id]
    assert st.state is JobState.UNKNOWN and st.lookup_failed and not st.not_found
    assert "sacct failed" in st.reason and "Problem talking to the database" in st.reason
    with pytest.raises(SchedulerError, match="cannot tell what became of job") as waited:
        sched.wait([sub.job_id], timeout=30, poll=0.1)
    assert waited.value.exit_code == 5 and not isinstance(waited.value, NotFoundError)
    with pytest.raises(SchedulerError, match="cannot tell what became of job"):
        sched.cancel([sub.job_id])
    with pytest.raises(AccountingUnavailable, match="Problem talking to the database"):
        sched.find_jobs_for_run(sub.run_dir.path)

    faults.sacct_down(False)  # accounting answers again: the job is what it was
    assert sched.status([sub.job_id])[sub.job_id].state is JobState.COMPLETED
    _wait_for(lambda: sched.find_jobs_for_run(sub.run_dir.path), 30, "slurmdbd to record it")
    assert sched.find_jobs_for_run(sub.run_dir.path) == [sub.job_id]


# ---------------------------------------------------------------------------------------------
# Item: a slow sbatch


def test_a_timed_out_sbatch_is_a_distinct_error(
    faults: Faults, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = write_site(tmp_path, "dev")
    faults.sbatch("lost")
    monkeypatch.setenv("PATH", faults.env()["PATH"])
    monkeypatch.setenv("AIMASS_SBATCH_TIMEOUT", "1")
    script = tmp_path / "s.sh"
    script.write_text("#!/bin/bash\ntrue\n")
    with pytest.raises(CommandTimeout, match="sbatch did not answer within 1s") as timed_out:
        get_scheduler(site).submit(script, run_dir=tmp_path)
    assert isinstance(timed_out.value, SchedulerError) and timed_out.value.argv[0] == "sbatch"


def _tiny_spec(tmp_path: Path) -> Path:
    spec = tmp_path / "slow.toml"
    spec.write_text(
        '[job]\nname = "slow-sbatch"\ntime = "2"\n'
        'command = ["bash", "-c", "echo ran-once >> \\"$AIMASS_RUN_DIR/ran\\""]\n'
    )
    return spec


def test_a_slow_sbatch_adopts_the_job_it_queued(faults: Faults, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    faults.sbatch("slow")
    start = time.monotonic()
    out = aimass(
        faults, "submit", "--site", str(site.source), str(_tiny_spec(tmp_path)), "--json",
        AIMASS_SBATCH_TIMEOUT="3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - start < 30  # the timeout applied, not sbatch's 60 s hang
    sub = json.loads(out.stdout)
    job_id = sub["job_id"]
    assert job_id and "adopted job" in sub["note"] and "did not answer within 3s" in sub["note"]
    assert f"adopted job {job_id}" in out.stderr
    assert faults.sbatch_calls() == 1
    run_dir = Path(sub["run_dir"])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "submitted" and state["job_id"] == job_id and state["adopted"]
    assert (site.runs_root / ".jobs" / job_id).read_text().strip() == run_dir.name
    waited = aimass(faults, "wait", "--site", str(site.source), job_id, "--json")
    assert waited.returncode == 0, waited.stderr
    assert (run_dir / "ran").read_text() == "ran-once\n"


def test_a_hung_sbatch_that_queued_nothing_says_so(faults: Faults, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    faults.sbatch("lost")
    out = aimass(
        faults, "submit", "--site", str(site.source), str(_tiny_spec(tmp_path)),
        AIMASS_SBATCH_TIMEOUT="2",
    )  # fmt: skip
    assert out.returncode == 5, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert "sbatch did not answer within 2s" in line
    assert "may still be queued" in line and "aimass status" in line and "squeue" in line
    (run_dir,) = [p for p in site.runs_root.iterdir() if not p.name.startswith(".")]
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "submit_unknown" and "job_id" not in state
    # asking later: nothing was queued for that run directory, and aimass says so plainly
    status = aimass(faults, "status", "--site", str(site.source), str(run_dir))
    assert status.returncode == 3, status.stderr
    assert "was not queued" in status.stderr and "Traceback" not in status.stderr


def test_a_search_trial_with_a_slow_sbatch_is_adopted_not_resubmitted(
    faults: Faults, tmp_path: Path
) -> None:
    site = write_site(tmp_path, "dev")
    spec_path = write_spec(
        tmp_path, budget=1, parallel=1, env={"OBJ_SLEEP": "0.5"}, extra=TRIAL_TIME
    )
    faults.sbatch("slow")
    out = aimass(
        faults, "search", str(spec_path), "--site", str(site.source),
        "--dir", str(tmp_path / "search"), "--json", AIMASS_SBATCH_TIMEOUT="3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (trial,) = json.loads(out.stdout)["trials"]
    assert trial["state"] == "finished" and trial["attempts"] == 1
    assert "sbatch did not answer within 3s, but the job was queued: adopted job" in out.stderr
    assert "submission failed" not in out.stderr  # adopted at once, not after a failure
    assert faults.sbatch_calls() == 1
    assert [e["trial"] for e in executions(tmp_path) if e["event"] == "start"] == [0]
