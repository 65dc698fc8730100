"""The search driver on the local scheduler (real subprocess jobs, no Slurm needed).

The same driver runs on Slurm in tests/test_search_driver_cluster.py; here the crash and
reconciliation cases are built precisely by writing the journal as a killed driver left it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aimass_hpc.common.errors import ConflictError
from aimass_hpc.config.search_spec import load_search_spec
from aimass_hpc.config.site import load_site
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.search_driver import (
    PARAMS_FILE,
    SearchDir,
    SearchDriver,
    create_search,
    read_trial_value,
    trial_payload,
)

OBJECTIVE = """\
import json, os, sys, time
x = float(sys.argv[1]); kind = sys.argv[2]
tid = int(os.environ["AIMASS_TRIAL_ID"])
params = json.loads(os.environ["AIMASS_TRIAL_PARAMS"])
with open(os.path.join(os.environ["AIMASS_RUN_DIR"], "params.json")) as fh:
    assert json.load(fh) == params, "params.json and AIMASS_TRIAL_PARAMS disagree"
log = os.path.join(os.path.dirname(os.path.abspath(__file__)), "executions.jsonl")
def note(event):
    with open(log, "a") as fh:
        fh.write(json.dumps({"trial": tid, "event": event, "t": time.time()}) + "\\n")
note("start")
final = (x - 1.0) ** 2 + (0.5 if kind == "b" else 0.0)
steps = int(os.environ.get("OBJ_STEPS", "1"))
for step in range(1, steps + 1):
    time.sleep(float(os.environ.get("OBJ_SLEEP", "0.2")) / steps)
    if steps > 1:  # an intermediate curve converging to the final value (for pruning)
        with open(os.path.join(os.environ["AIMASS_RUN_DIR"], "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"kind": "step", "step": step, "value": final + 1 / step}) + "\\n")
note("end")
if str(tid) in os.environ.get("OBJ_FAIL_TRIALS", "").split(","):
    print("objective: boom", file=sys.stderr)
    sys.exit(3)
if str(tid) in os.environ.get("OBJ_REPORT_TRIALS", "").split(","):
    # what aimass_hpc.runtime.report_result writes (the trial's own record of its result)
    with open(os.path.join(os.environ["AIMASS_RUN_DIR"], "result.json"), "w") as fh:
        json.dump({"status": "completed", "metrics": {"value": final}}, fh)
print("objective: done")
print(final)
"""


def write_site(tmp: Path) -> Path:
    path = tmp / "site.toml"
    path.write_text(
        f"""
name = "localtest"
scheduler = "local"
python = ""
[partitions.local]
default = true
nodes = 1
cpus_per_node = 2
[mpi]
launcher = "none"
srun_mpi = "none"
[filesystems]
runs = "{tmp / "runs"}"
models = "{tmp / "models"}"
[preemption]
max_restarts = 0
"""
    )
    return path


def write_spec(
    tmp: Path,
    *,
    budget: int = 4,
    parallel: int = 2,
    sampler: str = "random",
    env: dict[str, str] | None = None,
    extra: str = "",
) -> Path:
    (tmp / "objective.py").write_text(OBJECTIVE)
    env_line = ", ".join(f'{k} = "{v}"' for k, v in (env or {}).items())
    path = tmp / "search.toml"
    path.write_text(
        f"""
[search]
name = "quad"
sampler = "{sampler}"
seed = 7
budget = {budget}
parallel = {parallel}
poll_interval = 0.2
max_attempts = 2

[objective]
command = ["{{python}}", "objective.py", "{{x}}", "{{kind}}"]
env = {{ {env_line} }}

[space]
x = {{type = "float", low = -3.0, high = 3.0}}
kind = {{type = "categorical", choices = ["a", "b"]}}
{extra}
"""
    )
    return path


def executions(tmp: Path) -> list[dict]:
    path = tmp / "executions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def setup(tmp_path: Path):
    site = load_site(str(write_site(tmp_path)))
    return tmp_path, site


def new_search(tmp: Path, site, **spec_kwargs) -> SearchDir:
    spec = load_search_spec(write_spec(tmp, **spec_kwargs))
    return create_search(spec, site, directory=tmp / "search")


# ---------------------------------------------------------------------------------------------


def test_search_runs_every_trial_once_with_its_params(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=5, parallel=2)
    events: list[str] = []
    state = SearchDriver(sdir, site, echo=events.append).run()
    assert state.finished
    assert [t.id for t in state.trials.values()] == [0, 1, 2, 3, 4]
    assert all(t.state == J.FINISHED for t in state.trials.values())
    for t in state.trials.values():
        run = Path(t.run_dir)
        assert run.parent == sdir.trials_root
        assert json.loads((run / PARAMS_FILE).read_text()) == t.params
        x, kind = t.params["x"], t.params["kind"]
        assert t.value == pytest.approx((x - 1.0) ** 2 + (0.5 if kind == "b" else 0.0))
    started = [e["trial"] for e in executions(tmp) if e["event"] == "start"]
    assert sorted(started) == [0, 1, 2, 3, 4]
    best = state.best_trial("minimize")
    assert state.best["trial"] == best.id
    assert any("search finished" in e for e in events)


def test_the_driver_reads_each_journal_line_once_whatever_the_polls(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=4, parallel=2)
    driver = SearchDriver(sdir, site)
    state = driver.run()
    lines = sdir.journal_path.read_bytes().count(b"\n")
    # the driver polled many times, yet parsed every line exactly once (no full replays)
    assert driver.polls > 2
    assert driver.journal.parsed_lines == lines
    assert driver.state() is state and driver.journal.parsed_lines == lines
    assert state == sdir.state() == J.replay(sdir.journal().records())


def test_every_action_is_journaled_before_the_next(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=3, parallel=1)
    SearchDriver(sdir, site).run()
    kinds = [(r["type"], r.get("trial")) for r in sdir.journal().records()]
    # with one trial at a time the journal is a strict sequence per trial
    for tid in range(3):
        mine = [k for k, t in kinds if t == tid and k != J.TRIAL_RUNNING]
        assert mine == [J.TRIAL_PROPOSED, J.TRIAL_SUBMITTED, J.TRIAL_FINISHED]
    assert kinds[0][0] == J.SEARCH_CREATED and kinds[-1][0] == J.SEARCH_FINISHED
    seqs = [r["seq"] for r in sdir.journal().records()]
    assert seqs == list(range(len(seqs)))


def test_a_failing_trial_is_recorded_and_the_search_goes_on(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=4, parallel=2, env={"OBJ_FAIL_TRIALS": "1"})
    state = SearchDriver(sdir, site).run()
    assert [t.state for t in state.trials.values()] == [
        J.FINISHED,
        J.FAILED,
        J.FINISHED,
        J.FINISHED,
    ]
    failed = state.trials[1]
    assert "exit code 3" in failed.reason and "boom" in failed.reason
    assert failed.value is None


def test_a_trial_with_no_value_fails_with_a_clear_reason(setup) -> None:
    tmp, site = setup
    spec_path = write_spec(tmp, budget=1, parallel=1)
    text = spec_path.read_text().replace(
        'command = ["{python}", "objective.py", "{x}", "{kind}"]',
        'command = ["{python}", "-c", "print(\'no number here\')"]',
    )
    spec_path.write_text(text)
    sdir = create_search(load_search_spec(spec_path), site, directory=tmp / "search")
    state = SearchDriver(sdir, site).run()
    (trial,) = state.trials.values()
    assert trial.state == J.FAILED
    assert "reported no value for 'value'" in trial.reason
    assert state.finished and state.best is None


def test_resume_submits_a_trial_journaled_but_never_submitted(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=3, parallel=2)
    # A driver killed right after journaling its first proposal.
    from aimass_hpc.launch.search_driver import make_sampler

    spec = sdir.spec()
    (first,) = make_sampler(spec, spec.search.seed).ask(1)
    sdir.journal().append(J.TRIAL_PROPOSED, trial=first.id, params=first.params)
    state = SearchDriver(sdir, site).run()
    assert [t.id for t in state.trials.values()] == [0, 1, 2]
    assert state.trials[0].params == first.params
    assert state.trials[0].attempts == 1
    started = sorted(e["trial"] for e in executions(tmp) if e["event"] == "start")
    assert started == [0, 1, 2]


def test_resume_adopts_a_job_queued_just_before_the_kill(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=2, parallel=2)
    from aimass_hpc.launch.search_driver import build_trial, make_sampler
    from aimass_hpc.launch.submit import submit

    spec = sdir.spec()
    (first,) = make_sampler(spec, spec.search.seed).ask(1)
    sdir.journal().append(J.TRIAL_PROPOSED, trial=first.id, params=first.params)
    # ...the job was queued, but the driver died before journaling its id
    request, files = build_trial(spec, site, sdir, first.id, first.params)
    sub = submit(
        site,
        request,
        spec=trial_payload(spec, sdir, first.id, first.params, 1),
        files=files,
        runs_root=sdir.trials_root,
    )
    state = SearchDriver(sdir, site).run()
    assert state.trials[0].job_id == sub.job_id
    assert state.trials[0].state == J.FINISHED
    adopted = [r for r in sdir.journal().records() if r.get("adopted")]
    assert len(adopted) == 1
    assert sorted(e["trial"] for e in executions(tmp) if e["event"] == "start") == [0, 1]
    assert len([p for p in sdir.trials_root.iterdir() if not p.name.startswith(".")]) == 2


def test_a_lost_job_is_resubmitted_under_the_same_trial_id(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=2, parallel=2)
    from aimass_hpc.launch.search_driver import make_sampler

    spec = sdir.spec()
    (first,) = make_sampler(spec, spec.search.seed).ask(1)
    jr = sdir.journal()
    jr.append(J.TRIAL_PROPOSED, trial=first.id, params=first.params)
    # a job id the scheduler has never heard of (purged, or another cluster's)
    jr.append(J.TRIAL_SUBMITTED, trial=first.id, job_id="987654", run_dir=str(tmp / "gone"))
    state = SearchDriver(sdir, site).run()
    t0 = state.trials[0]
    assert t0.state == J.FINISHED
    assert t0.attempts == 2 and t0.job_ids[0] == "987654" and t0.job_id != "987654"
    assert any(r["type"] == J.TRIAL_LOST for r in jr.records())
    assert len(state.trials) == 2


def _ran_dir(tmp: Path, job_id: str, result: float | None = None) -> Path:
    """A trial run directory whose job started (its log header) and maybe reported a value."""
    run_dir = tmp / f"ran-{job_id}"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "restart-0.log").write_text(
        f"aimass: job {job_id} restart 0 on node1 at 2026-01-01T00:00:00+00:00\nobjective: done\n"
    )
    if result is not None:
        (run_dir / "result.json").write_text(json.dumps({"metrics": {"value": result}}))
    return run_dir


def test_a_job_that_ran_is_never_resubmitted_when_the_scheduler_forgot_it(setup) -> None:
    """Unknown to the scheduler, but its run directory shows it started: no second run."""
    tmp, site = setup
    sdir = new_search(tmp, site, budget=2, parallel=2)
    jr = sdir.journal()
    for trial, job, result in ((0, "987001", 0.25), (1, "987002", None)):
        jr.append(J.TRIAL_PROPOSED, trial=trial, params={"x": 0.5, "kind": "a"})
        jr.append(
            J.TRIAL_SUBMITTED, trial=trial, job_id=job, run_dir=str(_ran_dir(tmp, job, result))
        )
    state = SearchDriver(sdir, site).run()
    assert state.trials[0].state == J.FINISHED and state.trials[0].value == 0.25
    assert state.trials[1].state == J.FAILED and "ran (its run directory has logs)" in (
        state.trials[1].reason
    )
    assert [t.attempts for t in state.trials.values()] == [1, 1]
    assert not any(r["type"] == J.TRIAL_LOST for r in jr.records())
    assert executions(tmp) == []  # nothing was run again


def test_an_orphan_run_dir_is_adopted_by_the_job_id_in_its_log(setup) -> None:
    """A submission whose id reached neither the journal nor state.json, but whose job ran."""
    tmp, site = setup
    sdir = new_search(tmp, site, budget=1, parallel=1)
    from aimass_hpc.launch.search_driver import run_evidence

    sdir.journal().append(J.TRIAL_PROPOSED, trial=0, params={"x": 0.5, "kind": "a"})
    orphan = sdir.trials_root / "20260101-000000-quad-t0000-abcdef"
    (orphan / "logs").mkdir(parents=True)
    (orphan / PARAMS_FILE).write_text("{}")
    spec = sdir.spec()
    (orphan / "spec.json").write_text(
        json.dumps({"spec": trial_payload(spec, sdir, 0, {"x": 0.5, "kind": "a"}, 1)})
    )
    (orphan / "logs" / "restart-0.log").write_text("aimass: job 987003 restart 0 on n1 at -\n")
    (orphan / "result.json").write_text(json.dumps({"metrics": {"value": 0.5}}))
    assert run_evidence(orphan).job_id == "987003"
    state = SearchDriver(sdir, site).run()
    (trial,) = state.trials.values()
    assert trial.job_id == "987003" and trial.state == J.FINISHED and trial.value == 0.5
    assert executions(tmp) == []


def test_a_trial_lost_too_often_fails(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=1, parallel=1)
    jr = sdir.journal()
    jr.append(J.TRIAL_PROPOSED, trial=0, params={"x": 0.0, "kind": "a"})
    for attempt, job in enumerate(["900001", "900002"], start=1):
        jr.append(J.TRIAL_SUBMITTED, trial=0, job_id=job, run_dir=str(tmp / job), attempt=attempt)
        if attempt == 1:
            jr.append(J.TRIAL_LOST, trial=0, job_id=job, reason="vanished")
    state = SearchDriver(sdir, site).run()  # max_attempts = 2 in the spec
    assert state.trials[0].state == J.FAILED
    assert "lost 2 times" in state.trials[0].reason


def test_resumed_search_proposes_what_an_uninterrupted_one_would(setup) -> None:
    tmp, site = setup
    whole = new_search(tmp, site, budget=4, parallel=2)
    full = SearchDriver(whole, site).run()
    # the same spec, interrupted after two finished trials (journal rebuilt from the first)
    other = tmp / "second"
    other.mkdir()
    spec = whole.spec()
    from aimass_hpc.config.search_spec import spec_from_record

    sdir = create_search(spec_from_record(spec.to_record()), site, directory=other / "search")
    jr = sdir.journal()
    for t in list(full.trials.values())[:2]:
        jr.append(J.TRIAL_PROPOSED, trial=t.id, params=t.params)
        jr.append(J.TRIAL_SUBMITTED, trial=t.id, job_id=t.job_id, run_dir=t.run_dir)
        jr.append(J.TRIAL_FINISHED, trial=t.id, value=t.value)
    resumed = SearchDriver(sdir, site).run()
    assert [t.params for t in resumed.trials.values()] == [t.params for t in full.trials.values()]


def test_only_one_driver_at_a_time(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=1, parallel=1)
    first = SearchDriver(sdir, site)
    first.lock.acquire()
    try:
        with pytest.raises(ConflictError, match="being driven by pid"):
            SearchDriver(sdir, site).run()
    finally:
        first.lock.release()


def test_a_dead_drivers_lock_does_not_block_resume(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=1, parallel=1)
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    sdir.lock_path.write_text(
        json.dumps({"host": J._HOST, "pid": proc.pid, "start": None, "time": 0, "token": "x"})
    )
    state = SearchDriver(sdir, site).run()
    assert state.finished and len(state.trials) == 1


def test_a_finished_search_resumes_to_nothing(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=2, parallel=2)
    SearchDriver(sdir, site).run()
    n = len(sdir.journal().records())
    state = SearchDriver(sdir, site).run()
    assert state.finished and len(state.trials) == 2
    assert len(sdir.journal().records()) == n


# ---------------------------------------------------------------------------------------------
# where a trial's value comes from


def _run_dir(tmp: Path, log: str | None = None) -> Path:
    run = tmp / "run"
    (run / "logs").mkdir(parents=True)
    if log is not None:
        (run / "logs" / "restart-0.log").write_text(log)
    return run


def test_value_from_the_last_numeric_output_line(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "aimass: job 1\nloss 0.9\n0.5\nstill working\n0.25\n\n")
    assert read_trial_value(run, "loss", "command") == (0.25, "output (restart-0.log)")


def test_value_from_the_latest_restart_log(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "1.0\n")
    (run / "logs" / "restart-1.log").write_text("2.0\n")
    assert read_trial_value(run, "loss", "command")[0] == 2.0


def test_result_file_wins_over_output(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "0.5\n")
    (run / "result.json").write_text(json.dumps({"status": "completed", "metrics": {"acc": 0.9}}))
    assert read_trial_value(run, "acc", "command") == (0.9, "result.json:acc")
    (run / "result.json").write_text(json.dumps({"value": 0.7}))
    assert read_trial_value(run, "acc", "command") == (0.7, "result.json:value")


def test_training_value_from_metrics(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "")
    lines = [
        {"kind": "epoch", "step": 10, "val_loss": 0.8},
        {"kind": "epoch", "step": 20, "val_loss": 0.4},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_trial_value(run, "val_loss", "train") == (0.4, "metrics.jsonl:val_loss")


def test_no_value_anywhere(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, "done\n")
    assert read_trial_value(run, "loss", "command") == (None, "")


# ---------------------------------------------------------------------------------------------
# the CLI (in-process is enough here: the cluster tests run it as a subprocess)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_runs_a_search_and_shows_status_and_plots(setup) -> None:
    tmp, _site = setup
    spec = write_spec(tmp, budget=3, parallel=2)
    out = _cli(
        "search", str(spec), "--site", str(tmp / "site.toml"), "--dir", str(tmp / "s"), "--json"
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["finished"] and summary["counts"] == {"finished": 3}
    assert len(summary["trials"]) == 3
    table = _cli("search", "status", str(tmp / "s"))
    assert table.returncode == 0
    assert "3/3 trials proposed" in table.stdout and "finished" in table.stdout
    plot = _cli("search", "plot", str(tmp / "s"), "--json")
    assert plot.returncode == 0, plot.stderr
    for path in json.loads(plot.stdout):
        assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_cli_dry_run_creates_nothing(setup) -> None:
    tmp, _site = setup
    spec = write_spec(tmp)
    out = _cli("search", str(spec), "--site", str(tmp / "site.toml"), "--dry-run")
    assert out.returncode == 0, out.stderr
    assert "#SBATCH --job-name=quad-t0000" in out.stdout
    assert "AIMASS_TRIAL_PARAMS=" in out.stdout
    assert not (tmp / "runs").exists()


def test_cli_bad_spec_is_one_line_naming_the_field(setup) -> None:
    tmp, _site = setup
    spec = write_spec(tmp)
    spec.write_text(spec.read_text().replace("parallel = 2", "parallel = 0"))
    out = _cli("search", str(spec), "--site", str(tmp / "site.toml"))
    assert out.returncode == 2
    assert out.stderr.startswith("aimass: error:") and "search.parallel" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cli_resume_of_a_missing_directory_is_not_found(tmp_path: Path) -> None:
    out = _cli("search", "resume", str(tmp_path / "nope"))
    assert out.returncode == 3 and "no search journal" in out.stderr


def test_cli_cancel_without_a_live_driver_cancels_the_trials(setup) -> None:
    tmp, site = setup
    sdir = new_search(tmp, site, budget=3, parallel=2, env={"OBJ_SLEEP": "60"})
    from aimass_hpc.launch.search_driver import build_trial, make_sampler
    from aimass_hpc.launch.submit import submit

    spec = sdir.spec()
    (first,) = make_sampler(spec, spec.search.seed).ask(1)
    sdir.journal().append(J.TRIAL_PROPOSED, trial=first.id, params=first.params)
    request, files = build_trial(spec, site, sdir, first.id, first.params)
    sub = submit(
        site,
        request,
        spec=trial_payload(spec, sdir, first.id, first.params, 1),
        files=files,
        runs_root=sdir.trials_root,
    )
    sdir.journal().append(
        J.TRIAL_SUBMITTED, trial=0, job_id=sub.job_id, run_dir=str(sub.run_dir.path)
    )
    out = _cli("search", "cancel", str(sdir.path), "--site", str(tmp / "site.toml"))
    assert out.returncode == 0, out.stderr
    state = sdir.state()
    assert state.finished and state.cancel_requested
    assert [t.state for t in state.trials.values()] == [J.CANCELLED]
    from aimass_hpc.launch.scheduler import get_scheduler

    assert get_scheduler(site).status([sub.job_id])[sub.job_id].state.value == "CANCELLED"


def test_pruning_stops_hopeless_trials_and_the_search_still_ends_at_budget(setup) -> None:
    tmp, site = setup
    sdir = new_search(
        tmp,
        site,
        budget=8,
        parallel=3,
        env={"OBJ_SLEEP": "4", "OBJ_STEPS": "8"},
        extra="[pruning]\nenabled = true\nmin_step = 2\nreduction_factor = 2\n",
    )
    state = SearchDriver(sdir, site).run()
    assert state.finished and list(state.trials) == list(range(8))
    pruned = state.by_state(J.PRUNED)
    assert pruned, "nothing was pruned"
    for t in pruned:
        assert t.reason.startswith("pruned at step") and t.pruned_step >= 2
        ended = [e for e in executions(tmp) if e["trial"] == t.id and e["event"] == "end"]
        assert not ended  # its job was stopped before the objective finished
    finished = state.by_state(J.FINISHED)
    assert finished and state.best_trial("minimize") in finished


def test_sigint_stops_the_driver_cleanly_and_resume_finishes(setup) -> None:
    import signal
    import time

    tmp, _site = setup
    spec = write_spec(tmp, budget=4, parallel=2, env={"OBJ_SLEEP": "2"})
    search_dir = tmp / "s"
    proc = subprocess.Popen(
        [sys.executable, "-m", "aimass_hpc", "search", str(spec)]
        + ["--site", str(tmp / "site.toml"), "--dir", str(search_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        recs = J.Journal(search_dir / J.JOURNAL_NAME).records() if search_dir.exists() else []
        if sum(r["type"] == J.TRIAL_SUBMITTED for r in recs) >= 2:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "aimass search resume" in err
    assert not (search_dir / "driver.lock").exists()  # released on the way out
    assert not SearchDir.open(search_dir).state().finished
    out = _cli("search", "resume", str(search_dir), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["counts"] == {"finished": 4}
    assert sorted(e["trial"] for e in executions(tmp) if e["event"] == "start") == [0, 1, 2, 3]
