"""Searches on the real local Slurm cluster: trials are sbatch jobs, the driver can die.

Trials are tiny (a Python one-liner sleeping a second or two) so a 12-trial search takes
seconds. The objective (tests/test_search_driver.py) appends start/end events to a shared file,
so the tests can count executions (no trial runs twice) and measure real concurrency.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _sitefixtures import write_site
from test_search_driver import executions, write_spec

from aimass_hpc.config.search_spec import load_search_spec
from aimass_hpc.launch import journal as J
from aimass_hpc.launch.runs import RunDir
from aimass_hpc.launch.scheduler import CountingRunner, get_scheduler
from aimass_hpc.launch.search_driver import SearchDir, SearchDriver, create_search

pytestmark = pytest.mark.cluster

TRIAL_TIME = '[trial]\ntime = "00:03:00"\n'


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _max_concurrency(events: list[dict]) -> int:
    running = peak = 0
    for e in sorted(events, key=lambda e: (e["t"], e["event"] == "start")):
        running += 1 if e["event"] == "start" else -1
        peak = max(peak, running)
    return peak


def _started(tmp: Path) -> list[int]:
    return sorted(e["trial"] for e in executions(tmp) if e["event"] == "start")


def _wait_journal(sdir: Path, predicate, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        records = J.Journal(sdir / J.JOURNAL_NAME).records()
        if predicate(records):
            return records
        if time.monotonic() > deadline:
            kinds = [r["type"] for r in records]
            raise AssertionError(f"journal never reached the expected state: {kinds}")
        time.sleep(0.3)


def test_twelve_trials_three_at_a_time_one_poll_per_call(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec = load_search_spec(
        write_spec(
            tmp_path,
            budget=12,
            parallel=3,
            sampler="mcts",
            env={"OBJ_SLEEP": "1.5", "OBJ_FAIL_TRIALS": "4"},
            extra=TRIAL_TIME,
        )
    )
    sdir = create_search(spec, site, directory=tmp_path / "search")
    runner = CountingRunner()
    driver = SearchDriver(sdir, site, scheduler=get_scheduler(site, runner), poll_interval=0.5)
    state = driver.run()

    assert state.finished
    assert list(state.trials) == list(range(12))
    assert state.trials[4].state == J.FAILED and "exit code 3" in state.trials[4].reason
    assert all(t.state == J.FINISHED for i, t in state.trials.items() if i != 4)
    assert _started(tmp_path) == list(range(12))  # each trial ran exactly once
    peak = _max_concurrency(executions(tmp_path))
    assert 2 <= peak <= 3, peak
    # one squeue per poll, whatever the number of running trials
    squeues = [c for c in runner.calls if c[0] == "squeue"]
    assert len(squeues) == driver.polls
    # asynchronous: some trial was proposed while two others were still in the queue
    active: set[int] = set()
    busy_proposals = 0
    for rec in sdir.journal().records():
        if rec["type"] == J.TRIAL_PROPOSED:
            busy_proposals += len(active) == 2
            active.add(rec["trial"])
        elif rec["type"] in (J.TRIAL_FINISHED, J.TRIAL_FAILED):
            active.discard(rec["trial"])
    assert busy_proposals >= 1

    table = _cli("search", "status", str(sdir.path), "--json")
    assert table.returncode == 0, table.stderr
    summary = json.loads(table.stdout)
    assert [t["id"] for t in summary["trials"]] == list(range(12))
    assert all(t["job_id"] and t["duration_s"] is not None for t in summary["trials"])
    assert summary["counts"] == {"finished": 11, "failed": 1}


def test_killed_driver_resumes_to_exactly_the_budget(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec_path = write_spec(
        tmp_path, budget=12, parallel=3, sampler="mcts", env={"OBJ_SLEEP": "2"}, extra=TRIAL_TIME
    )
    search_dir = tmp_path / "search"
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aimass_hpc", "search", str(spec_path)]
            + ["--site", str(site.source), "--dir", str(search_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_journal(
            search_dir,
            lambda recs: sum(r["type"] == J.TRIAL_SUBMITTED for r in recs) >= 5,
            timeout=180,
        )
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    before = SearchDir.open(search_dir).state()
    assert not before.finished and before.n_proposed < 12
    assert (search_dir / "driver.lock").exists()  # the dead driver's lock is left behind

    out = _cli("search", "resume", str(search_dir), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert [t["id"] for t in summary["trials"]] == list(range(12))
    assert summary["counts"] == {"finished": 12}
    assert all(t["attempts"] == 1 for t in summary["trials"])  # nothing lost, nothing redone
    assert _started(tmp_path) == list(range(12))  # no trial ran twice
    run_dirs = [p for p in (search_dir / "trials").iterdir() if not p.name.startswith(".")]
    # one queued job per trial; a run dir the kill caught before its sbatch stays "rendered"
    queued = sorted(RunDir(p).job_id or "" for p in run_dirs if RunDir(p).job_id)
    assert queued == sorted(t["job_id"] for t in summary["trials"])
    assert len(run_dirs) - len(queued) <= 1
    # the trials that were running during the kill were adopted, not resubmitted
    in_flight = [t.id for t in before.active if t.job_id]
    for tid in in_flight:
        assert summary["trials"][tid]["job_id"] == before.trials[tid].job_id


def test_detached_driver_runs_as_its_own_job(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec_path = write_spec(tmp_path, budget=4, parallel=2, env={"OBJ_SLEEP": "1"}, extra=TRIAL_TIME)
    search_dir = tmp_path / "search"
    out = _cli(
        "search", str(spec_path), "--site", str(site.source), "--dir", str(search_dir),
        "--detach", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["search_dir"] == str(search_dir) and info["driver_job_id"]
    records = _wait_journal(
        search_dir, lambda recs: any(r["type"] == J.SEARCH_FINISHED for r in recs), timeout=240
    )
    state = J.replay(records)
    assert [t.state for t in state.trials.values()] == [J.FINISHED] * 4
    (started,) = state.drivers
    assert started["job_id"] == info["driver_job_id"]  # the driver ran inside its job
    final = get_scheduler(site).wait([info["driver_job_id"]], timeout=60)
    assert final[info["driver_job_id"]].state.value == "COMPLETED"


def test_cancel_stops_a_detached_search_and_its_trials(cluster, tmp_path: Path) -> None:
    site = write_site(tmp_path, "dev")
    spec_path = write_spec(
        tmp_path, budget=6, parallel=2, env={"OBJ_SLEEP": "120"}, extra=TRIAL_TIME
    )
    search_dir = tmp_path / "search"
    out = _cli(
        "search", str(spec_path), "--site", str(site.source), "--dir", str(search_dir),
        "--detach", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    driver_job = json.loads(out.stdout)["driver_job_id"]
    records = _wait_journal(
        search_dir,
        lambda recs: sum(r["type"] == J.TRIAL_RUNNING for r in recs) >= 2,
        timeout=180,
    )
    jobs = [r["job_id"] for r in records if r["type"] == J.TRIAL_SUBMITTED]
    cancel = _cli("search", "cancel", str(search_dir))
    assert cancel.returncode == 0, cancel.stderr
    state = SearchDir.open(search_dir).state()
    assert state.finished and state.cancel_requested
    assert {t.state for t in state.trials.values()} == {J.CANCELLED}
    scheduler = get_scheduler(site)
    final = scheduler.wait([*jobs, driver_job], timeout=60)
    assert {final[j].state.value for j in jobs} == {"CANCELLED"}
    assert final[driver_job].is_terminal


def test_training_search_promotes_the_best_model(cluster, tmp_path: Path) -> None:
    """12 trials of a tiny training task (digits MLP), 3 at once; the best one becomes @best."""
    from aimass_hpc.repo import ModelRepository

    site = write_site(tmp_path, "dev")
    example = Path(__file__).resolve().parents[1] / "examples" / "search-digits"
    spec_path = tmp_path / "search.toml"
    train_path = tmp_path / "train.toml"
    train_path.write_text(
        (example / "train.toml")
        .read_text()
        .replace('pythonpath = ["../digits"]', f'pythonpath = ["{example.parent / "digits"}"]')
        .replace("steps = 60", "steps = 30")
    )
    spec_path.write_text(
        (example / "search.toml").read_text().replace("poll_interval = 1.0", "poll_interval = 0.5")
    )
    out = _cli(
        "search",
        str(spec_path),
        "--site",
        str(site.source),
        "--dir",
        str(tmp_path / "s"),
        "--json",
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert [t["id"] for t in summary["trials"]] == list(range(12))
    assert summary["counts"] == {"finished": 12}
    best = summary["best"]
    assert best["value"] == max(t["value"] for t in summary["trials"])
    promoted = ModelRepository(site.models_root).get("digits-search@best")
    assert promoted.metrics["accuracy"] == pytest.approx(best["value"])
    assert promoted.run["run_dir"] == best["run_dir"]
    assert summary["promoted"]["version"] == promoted.number
    # parameters really reached the trainer: the final model's hyperparameters are the trial's
    assert promoted.hyperparameters["lr"] == pytest.approx(best["params"]["lr"])
    assert promoted.hyperparameters["optimizer"] == best["params"]["optimizer"]


def test_a_preempted_training_trial_resumes_from_its_checkpoint(cluster, tmp_path: Path) -> None:
    """Requeue (what preemption does) a running trial: same job, same run dir, it continues
    from its last checkpoint and the search records one trial, one job, one value."""
    site = write_site(tmp_path, "dev")
    example = Path(__file__).resolve().parents[1] / "examples" / "search-digits"
    (tmp_path / "train.toml").write_text(
        (example / "train.toml")
        .read_text()
        .replace('pythonpath = ["../digits"]', f'pythonpath = ["{example.parent / "digits"}"]')
        .replace("hidden = 32, dropout = 0.1", "hidden = 32, dropout = 0.1, step_delay = 0.1")
        .replace("steps = 60", "steps = 120")
        .replace("checkpoint_every = 30", "checkpoint_every = 10")
    )
    (tmp_path / "search.toml").write_text(
        '[search]\nname = "preempt"\nsampler = "random"\nseed = 1\ndirection = "maximize"\n'
        'metric = "accuracy"\nbudget = 1\nparallel = 1\npoll_interval = 0.5\n'
        '[objective]\ntrain = "train.toml"\n'
        '[space]\nlr = { type = "float", low = 0.05, high = 0.2, log = true }\n'
    )
    search_dir = tmp_path / "s"
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aimass_hpc", "search", str(tmp_path / "search.toml")]
            + ["--site", str(site.source), "--dir", str(search_dir), "--json"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    try:
        records = _wait_journal(
            search_dir, lambda recs: any(r["type"] == J.TRIAL_SUBMITTED for r in recs), 120
        )
        (sub,) = [r for r in records if r["type"] == J.TRIAL_SUBMITTED]
        metrics = Path(sub["run_dir"]) / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and '"checkpoint"' in metrics.read_text()):
            assert time.monotonic() < deadline, "no checkpoint before the preemption"
            time.sleep(0.3)
        get_scheduler(site).requeue(sub["job_id"])
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "driver.log").read_text()[-2000:]
    (trial,) = json.loads(out)["trials"]
    assert trial["state"] == "finished" and trial["attempts"] == 1
    assert trial["job_ids"] == [sub["job_id"]]  # Slurm requeued it; the search did not resubmit
    result = json.loads((Path(sub["run_dir"]) / "result.json").read_text())
    assert result["restart"] >= 1
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumes = [e for e in events if e.get("event") == "resume"]
    assert resumes and resumes[0]["step"] > 0  # continued from a checkpoint, not from step 0
