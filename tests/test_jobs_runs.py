"""Run directories and submission, on the local (subprocess) backend: no cluster needed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _sitefixtures import local_site  # noqa: F401 - fixture

from aimass_hpc.common.errors import InputError, NotFoundError, SchedulerError
from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.launch.runs import RunDir, find_run, index_job, list_runs
from aimass_hpc.launch.scheduler import JobState, get_scheduler
from aimass_hpc.launch.scheduler.local import LocalScheduler
from aimass_hpc.launch.submit import submit, submit_script


def _req(**fields) -> JobRequest:
    return JobRequest(**{"name": "t", "command": ["bash", "-c", "echo hi"], **fields})


def test_submit_writes_the_run_directory(local_site):  # noqa: F811
    sub = submit(
        local_site,
        _req(name="my job"),
        spec={"lr": 0.1},
        files={"conf/a.json": "{}", "b.bin": b"\x00\x01"},
    )
    run = sub.run_dir
    assert run.path.parent == local_site.runs_root
    assert run.path.name.split("-", 2)[2].startswith("my_job-")
    spec = run.read_spec()
    assert spec["spec"] == {"lr": 0.1} and spec["site"] == "local"
    assert spec["request"]["name"] == "my job" and spec["request"]["launcher"] == "none"
    assert run.script_path.read_text() == sub.script
    assert os.access(run.script_path, os.X_OK)
    assert (run.path / "conf" / "a.json").read_text() == "{}"
    assert (run.path / "b.bin").read_bytes() == b"\x00\x01"
    state = run.read_state()
    assert state["status"] == "submitted" and state["job_id"] == sub.job_id
    assert find_run(sub.job_id, local_site.runs_root) == run
    assert find_run(str(run.path), local_site.runs_root) == run
    final = get_scheduler(local_site).wait([sub.job_id], timeout=30)[sub.job_id]
    assert final.state is JobState.COMPLETED and final.exit_code == 0
    log = run.log_file().read_text()
    assert log.startswith(f"aimass: job {sub.job_id} restart 0") and "hi\n" in log
    assert [p.name for p in run.log_files()] == ["restart-0.log"]


def test_dry_run_writes_and_queues_nothing(local_site):  # noqa: F811
    sub = submit(local_site, _req(), dry_run=True)
    assert sub.job_id is None and "#SBATCH --job-name=t" in sub.script
    assert not local_site.runs_root.exists()


def test_bad_requests_leave_no_run_directory(local_site):  # noqa: F811
    with pytest.raises(InputError, match="^nodes: "):
        submit(local_site, _req(nodes=2))
    with pytest.raises(InputError, match="^array: "):
        submit(local_site, _req(array="0-3"))
    with pytest.raises(InputError, match="^dependency: "):
        submit(local_site, _req(dependency="afterok:1"))
    with pytest.raises(InputError, match="^files: "):
        submit(local_site, _req(), files={"../escape": "x"})
    assert list_runs(local_site.runs_root) == [] or all(
        r.read_state().get("status") != "submitted" for r in list_runs(local_site.runs_root)
    )


def test_a_failed_submission_is_recorded(local_site, tmp_path):  # noqa: F811
    class Refusing(LocalScheduler):
        def submit(self, *args, **kwargs):
            raise SchedulerError("sbatch refused the job: no")

    with pytest.raises(SchedulerError):
        submit(local_site, _req(), scheduler=Refusing(tmp_path / "state"))
    (run,) = list_runs(local_site.runs_root)
    assert run.read_state()["status"] == "submit_failed" and run.job_id is None


def test_local_job_sees_slurm_variables(local_site):  # noqa: F811
    cmd = 'echo "$SLURM_JOB_ID $SLURM_NNODES $SLURM_NTASKS $SLURM_PROCID $SLURMD_NODENAME"'
    sub = submit(local_site, _req(command=["bash", "-c", cmd]))
    get_scheduler(local_site).wait([sub.job_id], timeout=30)
    last = sub.run_dir.log_file().read_text().splitlines()[-1].split()
    assert last[:4] == [sub.job_id, "1", "1", "0"] and last[4]


def test_local_cancel_and_unknown_ids(local_site):  # noqa: F811
    sched = get_scheduler(local_site)
    sub = submit(local_site, _req(command=["sleep", "30"]))
    assert sched.status([sub.job_id])[sub.job_id].state is JobState.RUNNING
    assert sched.cancel([sub.job_id]) == [sub.job_id]
    final = sched.wait([sub.job_id], timeout=15)[sub.job_id]
    assert final.state is JobState.CANCELLED
    assert sched.cancel([sub.job_id]) == []  # already finished: nothing to do
    with pytest.raises(NotFoundError, match="unknown job id.*424242"):
        sched.cancel(["424242"])
    assert sched.status(["424242"])["424242"].state is JobState.UNKNOWN


def test_failed_job_exit_code(local_site):  # noqa: F811
    sub = submit(local_site, _req(command=["bash", "-c", "exit 7"]))
    final = get_scheduler(local_site).wait([sub.job_id], timeout=30)[sub.job_id]
    assert final.state is JobState.FAILED and final.exit_code == 7


def test_plain_script_submission(local_site, tmp_path):  # noqa: F811
    script = tmp_path / "mine.sh"
    script.write_text('#!/bin/bash\necho "run dir: $AIMASS_RUN_DIR name: $AIMASS_JOB_NAME"\n')
    sub = submit_script(local_site, script, name="my script")
    final = get_scheduler(local_site).wait([sub.job_id], timeout=30)[sub.job_id]
    assert final.state is JobState.COMPLETED
    (out,) = sub.run_dir.batch_logs()
    assert out.read_text() == f"run dir: {sub.run_dir.path} name: my script\n"
    with pytest.raises(InputError, match="must start with #!"):
        script.write_text("echo hi\n")
        submit_script(local_site, script)
    script.write_text("#!/bin/bash\n#SBATCH --nodes=2\n")
    with pytest.raises(InputError, match="^nodes: "):
        submit_script(local_site, script)


def test_find_run_and_index(tmp_path):
    run = RunDir.create(tmp_path, "a b/c")
    run.update_state(name="a b/c", job_id="77")
    index_job(tmp_path, "77", run)
    assert find_run("77", tmp_path) == run
    assert find_run("77_3", tmp_path) == run  # an array task finds its array's run
    assert run.name == "a b/c"
    with pytest.raises(NotFoundError, match="no run directory for job 78"):
        find_run("78", tmp_path)
    with pytest.raises(NotFoundError):
        find_run("not-a-run", tmp_path)


def test_log_files_per_restart_and_task(tmp_path):
    run = RunDir.create(tmp_path, "x")
    for name in [
        "restart-0.log",
        "restart-1.log",
        "restart-10.log",
        "task-2-restart-0.log",
        "slurm-5.out",
    ]:
        (run.logs_dir / name).write_text(name)
    assert [p.name for p in run.log_files(task=-1)] == [
        "restart-0.log",
        "restart-1.log",
        "restart-10.log",
    ]
    assert run.log_file().name == "restart-10.log"
    assert run.log_file(restart=1).name == "restart-1.log"
    assert run.log_file(task=2).name == "task-2-restart-0.log"
    assert [p.name for p in run.batch_logs()] == ["slurm-5.out"]


def test_list_runs_newest_first(tmp_path):
    names = []
    for i in range(3):
        run = RunDir(tmp_path / f"2026010{i}-000000-x-abc")
        run.path.mkdir()
        run.update_state(name=str(i))
        names.append(run.path.name)
    (tmp_path / ".jobs").mkdir()
    assert [r.path.name for r in list_runs(tmp_path)] == names[::-1]
    assert len(list_runs(tmp_path, limit=2)) == 2


def test_state_json_is_valid_json(local_site):  # noqa: F811
    sub = submit(local_site, _req())
    assert json.loads(sub.run_dir.state_path.read_text())["kind"] == "job"
    get_scheduler(local_site).wait([sub.job_id], timeout=30)


def test_last_finds_the_newest_run(local_site):  # noqa: F811
    with pytest.raises(NotFoundError, match="no runs under"):
        find_run("last", local_site.runs_root)
    first = submit(local_site, _req(name="first"))
    second = submit(local_site, _req(name="second"))
    assert find_run("last", local_site.runs_root) == second.run_dir
    get_scheduler(local_site).wait([first.job_id, second.job_id], timeout=30)


def test_wait_on_an_id_nobody_knows_does_not_hang(local_site):  # noqa: F811
    with pytest.raises(NotFoundError, match="unknown job id.*5555"):
        get_scheduler(local_site).wait(["5555"], timeout=30, poll=0.05)


def test_find_run_finds_search_trials_by_job_id(tmp_path):
    trials = tmp_path / "searches" / "20261201-s-abc" / "trials"
    run = RunDir.create(trials, "trial-3")
    index_job(trials, "4242", run)
    assert find_run("4242", tmp_path).path == run.path
    with pytest.raises(NotFoundError, match="4243"):
        find_run("4243", tmp_path)


# ------------------------------------------------------------ a runs root that cannot be written


def _fail_with(monkeypatch, code: int, when=lambda path: True):
    """Make the run directory's atomic writes fail with OS error ``code`` (for matching paths)."""
    import aimass_hpc.launch.runs as runs_mod

    real_text, real_json = runs_mod.atomic_write_text, runs_mod.atomic_write_json

    def wrap(real):
        def failing(path, *args, **kwargs):
            if when(Path(path)):
                raise OSError(code, os.strerror(code), str(path))
            return real(path, *args, **kwargs)

        return failing

    monkeypatch.setattr(runs_mod, "atomic_write_text", wrap(real_text))
    monkeypatch.setattr(runs_mod, "atomic_write_json", wrap(real_json))


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_a_runs_root_under_a_regular_file_is_one_input_error(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(InputError, match=rf"^runs root {regular}/runs: cannot create it: Not a "):
        RunDir.create(regular / "runs", "j")
    with pytest.raises(InputError, match=rf"^runs root {regular} exists and is not a directory"):
        RunDir.create(regular, "j")
    with pytest.raises(InputError, match=r"File name too long \(ENAMETOOLONG\)"):
        RunDir.create(tmp_path / ("r" * 300), "j")
    assert _leftovers(tmp_path) == ["file"]


def test_a_read_only_runs_root_is_an_input_error(tmp_path, monkeypatch):
    # root may write anywhere: a read-only filesystem is simulated at os.mkdir
    import errno

    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(InputError, match=r"^runs root .*/ro: cannot create it: Read-only file"):
        RunDir.create(tmp_path / "ro", "j")


def test_a_full_disk_is_a_system_error_and_leaves_no_half_made_run(local_site, monkeypatch):  # noqa: F811
    import errno

    root = local_site.runs_root
    _fail_with(monkeypatch, errno.ENOSPC, when=lambda p: p.name == "job.sh")
    with pytest.raises(SchedulerError, match=r"^cannot write .*/job\.sh: No space left on device"):
        submit(local_site, _req())
    assert _leftovers(root) == []  # the half-made run directory is gone
    monkeypatch.undo()
    _fail_with(monkeypatch, errno.EDQUOT, when=lambda p: p.name == "state.json")
    with pytest.raises(SchedulerError, match=r"state\.json: Disk quota exceeded"):
        submit(local_site, _req(), files={"conf/a.json": "{}"})
    assert _leftovers(root) == []


def test_a_bad_extra_file_leaves_no_half_made_run(local_site):  # noqa: F811
    with pytest.raises(InputError, match="^files: "):
        submit(local_site, _req(), files={"ok.txt": "x", "../escape": "x"})
    assert _leftovers(local_site.runs_root) == []


def test_an_index_that_cannot_be_written_names_the_queued_job(tmp_path, monkeypatch):
    import errno

    run = RunDir.create(tmp_path, "j")
    index_job(tmp_path, "41", run)
    before = (tmp_path / ".jobs" / "41").read_text()
    _fail_with(monkeypatch, errno.ENOSPC, when=lambda p: p.parent.name == ".jobs")
    with pytest.raises(SchedulerError, match=r"^job 42 was queued \(run directory .*\), but its"):
        index_job(tmp_path, "42", run)
    assert (tmp_path / ".jobs" / "41").read_text() == before  # the index is intact
    assert sorted(p.name for p in (tmp_path / ".jobs").iterdir()) == ["41"]  # no temp files


def test_a_written_run_is_never_removed_by_a_later_failure(tmp_path, monkeypatch):
    import errno

    run = RunDir.create(tmp_path, "j")
    run.update_state(status="rendered")
    _fail_with(monkeypatch, errno.EIO)
    with pytest.raises(SchedulerError, match="Input/output error"):
        run.update_state(status="submitted")
    assert run.exists() and run.read_state()["status"] == "rendered"


def test_damaged_state_and_hostile_refs_are_one_line_errors(tmp_path):
    from aimass_hpc.common.errors import IntegrityError

    run = RunDir.create(tmp_path, "j")
    run.state_path.write_text("{not json")
    with pytest.raises(IntegrityError, match=rf"^{run.state_path}: not valid JSON"):
        run.read_state()
    run.state_path.write_text("[1, 2]")
    with pytest.raises(IntegrityError, match="expected a JSON object, found list"):
        run.read_state()
    for ref in ("x" * 10000, "a\x00b", "../../etc", ""):
        with pytest.raises(NotFoundError) as info:
            find_run(ref, tmp_path)
        assert len(str(info.value)) < 300
    (tmp_path / ".jobs").mkdir()
    (tmp_path / ".jobs" / "7").write_bytes(b"\xff\xfe")  # a damaged index entry
    (tmp_path / ".jobs" / "8").write_text("../../etc\n")  # one that points outside
    for job in ("7", "8"):
        with pytest.raises(NotFoundError, match=f"no run directory for job {job}"):
            find_run(job, tmp_path)
