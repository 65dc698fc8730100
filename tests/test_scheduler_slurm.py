"""The Slurm backend against the real local cluster (scripts/dev-cluster): no mocks."""

from __future__ import annotations

import json
import time

import pytest
from _sitefixtures import dev_site, write_site  # noqa: F401 - fixture

from aimass_hpc.config.job_spec import JobRequest
from aimass_hpc.config.site import BUNDLED_SITES, load_site
from aimass_hpc.launch.render import TEMPLATE_NAMES, render_request
from aimass_hpc.launch.scheduler import CountingRunner, JobState, get_scheduler
from aimass_hpc.launch.submit import submit

pytestmark = pytest.mark.cluster
WAIT = 180  # seconds; jobs take a few, but other tests may share the cluster


def _req(**fields) -> JobRequest:
    return JobRequest(**{"name": "t", "command": ["bash", "-c", "echo hi"], "time": "5", **fields})


def _counting(site):
    runner = CountingRunner()
    return get_scheduler(site, runner=runner), runner


def test_submit_status_logs(cluster, dev_site):  # noqa: F811
    sub = submit(dev_site, _req(command=["bash", "-c", "echo out; echo err >&2; exit 3"]))
    sched = get_scheduler(dev_site)
    first = sched.status([sub.job_id])[sub.job_id]
    assert first.source == "squeue" and first.name == "t"
    final = sched.wait([sub.job_id], timeout=WAIT)[sub.job_id]
    assert final.state is JobState.FAILED and final.exit_code == 3
    assert final.nodes.startswith("node")
    log = sub.run_dir.log_file().read_text()
    assert "out\n" in log and "err\n" in log  # stderr goes to the same per-restart log
    assert sub.run_dir.log_file().name == "restart-0.log"


def test_cancel(cluster, dev_site):  # noqa: F811
    sched, runner = _counting(dev_site)
    sub = submit(dev_site, _req(command=["sleep", "120"]))
    assert sched.cancel([sub.job_id]) == [sub.job_id]
    final = sched.wait([sub.job_id], timeout=WAIT)[sub.job_id]
    assert final.state is JobState.CANCELLED
    assert sched.cancel([sub.job_id]) == []
    with pytest.raises(Exception, match="unknown job id.*999999"):
        sched.cancel([sub.job_id, "999999"])  # scancel itself would be silent


def test_two_nodes_two_gpus_each(cluster, dev_site):  # noqa: F811
    cmd = (
        'echo "rank=$SLURM_PROCID node=$SLURM_NODEID host=$SLURMD_NODENAME '
        'cvd=$CUDA_VISIBLE_DEVICES"'
    )
    sub = submit(
        dev_site, _req(nodes=2, ntasks_per_node=2, gpus_per_node=2, command=["bash", "-c", cmd])
    )
    final = get_scheduler(dev_site).wait([sub.job_id], timeout=WAIT)[sub.job_id]
    assert final.state is JobState.COMPLETED
    lines = [ln for ln in sub.run_dir.log_file().read_text().splitlines() if ln.startswith("rank=")]
    ranks = dict(ln.split(" ", 1) for ln in lines)
    assert sorted(ranks) == ["rank=0", "rank=1", "rank=2", "rank=3"]
    fields = [dict(kv.split("=", 1) for kv in ln.split()) for ln in lines]
    assert {f["node"] for f in fields} == {"0", "1"}
    assert len({f["host"] for f in fields}) == 2
    for f in fields:
        assert len(f["cvd"].split(",")) == 2, f  # set by Slurm from the gres binding


def test_array_with_a_cap_never_runs_three_at_once(cluster, dev_site, tmp_path):  # noqa: F811
    shared = tmp_path / "array"
    (shared / "running").mkdir(parents=True)
    body = (
        'cd "$1"; touch "running/$SLURM_ARRAY_TASK_ID"; '
        'ls running | wc -l > "count-$SLURM_ARRAY_TASK_ID"; sleep 2; '
        'ls running | wc -l >> "count-$SLURM_ARRAY_TASK_ID"; rm "running/$SLURM_ARRAY_TASK_ID"'
    )
    sub = submit(
        dev_site,
        _req(name="capped", array="0-4%2", command=["bash", "-c", body, "arr", str(shared)]),
    )
    sched = get_scheduler(dev_site)
    seen_running = 0
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        st = sched.status([sub.job_id])[sub.job_id]  # the array as a whole, tasks counted
        seen_running = max(seen_running, st.array_tasks.get("RUNNING", 0))
        if st.is_terminal:
            break
        time.sleep(0.3)
    assert st.state is JobState.COMPLETED, st
    counts = [int(n) for f in sorted(shared.glob("count-*")) for n in f.read_text().split()]
    assert len(list(shared.glob("count-*"))) == 5
    assert max(counts) <= 2 and 1 <= seen_running <= 2
    assert st.array_tasks == {"COMPLETED": 5}
    # One log per array task.
    assert len({p.name for p in sub.run_dir.log_files()}) == 5


def test_dependency_chain(cluster, dev_site, tmp_path):  # noqa: F811
    marks = tmp_path / "marks"
    marks.mkdir()
    step = 'sleep 1; ls "$1" > "$1/seen-$2"; touch "$1/$2"'
    a = submit(dev_site, _req(name="a", command=["bash", "-c", step, "s", str(marks), "a"]))
    b = submit(
        dev_site,
        _req(
            name="b",
            dependency=f"afterok:{a.job_id}",
            command=["bash", "-c", step, "s", str(marks), "b"],
        ),
    )
    c = submit(
        dev_site,
        _req(
            name="c",
            dependency=f"afterok:{b.job_id}",
            command=["bash", "-c", step, "s", str(marks), "c"],
        ),
    )
    sched = get_scheduler(dev_site)
    assert sched.status([c.job_id])[c.job_id].state is JobState.PENDING
    final = sched.wait([a.job_id, b.job_id, c.job_id], timeout=WAIT)
    assert all(st.state is JobState.COMPLETED for st in final.values()), final
    # Each step lists what the earlier ones left (the redirect creates its own seen-X first).
    assert (marks / "seen-a").read_text().split() == ["seen-a"]
    assert (marks / "seen-b").read_text().split() == ["a", "seen-a", "seen-b"]
    assert (marks / "seen-c").read_text().split() == ["a", "b", "seen-a", "seen-b", "seen-c"]


def test_status_of_many_jobs_is_one_scheduler_call(cluster, dev_site):  # noqa: F811
    subs = [submit(dev_site, _req(name=f"many-{i}", sbatch_extra=["--hold"])) for i in range(8)]
    ids = [s.job_id for s in subs]
    sched, runner = _counting(dev_site)
    try:
        statuses = sched.status(ids)
        assert len(runner.calls) == 1 and runner.calls[0][0] == "squeue"
        assert all(statuses[i].state is JobState.PENDING for i in ids)
        assert {statuses[i].name for i in ids} == {f"many-{i}" for i in range(8)}
    finally:
        get_scheduler(dev_site).cancel(ids)


def test_forgotten_jobs_come_from_sacct(cluster, dev_site):  # noqa: F811
    sub = submit(dev_site, _req(command=["true"]))
    sched = get_scheduler(dev_site)
    sched.wait([sub.job_id], timeout=WAIT)
    # The controller still knows the job (MinJobAge); ask accounting directly, as status()
    # does for ids squeue no longer lists. slurmdbd lags the controller: poll briefly.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = sched._sacct([sub.job_id])
        if sub.job_id in rows and rows[sub.job_id].state.is_terminal:
            break
        time.sleep(1)
    row = rows[sub.job_id]
    assert row.state is JobState.COMPLETED and row.source == "sacct" and row.exit_code == 0
    unknown = sched.status(["999999"])["999999"]
    assert unknown.state is JobState.UNKNOWN and not unknown.source


def test_requeue_starts_a_new_log(cluster, dev_site):  # noqa: F811
    sub = submit(
        dev_site,
        _req(
            requeue=True,
            command=[
                "bash",
                "-c",
                'echo "restart=$SLURM_RESTART_COUNT"; '
                '[ "${SLURM_RESTART_COUNT:-0}" -ge 1 ] '
                "|| sleep 60",
            ],
        ),
    )
    sched = get_scheduler(dev_site)
    deadline = time.monotonic() + WAIT
    while sched.status([sub.job_id])[sub.job_id].state is not JobState.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    while sub.run_dir.log_file() is None:
        time.sleep(0.2)
    sched.requeue(sub.job_id)
    final = sched.wait([sub.job_id], timeout=WAIT + 120)[sub.job_id]
    assert final.state is JobState.COMPLETED and final.restart_count == 1
    names = [p.name for p in sub.run_dir.log_files()]
    assert names == ["restart-0.log", "restart-1.log"]
    assert "restart=1" in sub.run_dir.log_file(restart=1).read_text()


def test_submitting_from_inside_a_job_strips_the_parent_allocation(cluster, dev_site):  # noqa: F811
    inner = (
        "import os; from aimass_hpc.config.site import load_site;"
        " from aimass_hpc.config.job_spec import JobRequest;"
        " from aimass_hpc.launch.submit import submit;"
        " s = submit(load_site(None), JobRequest(name='child', time='5', command=['bash', '-c',"
        " 'echo child cpus=${SLURM_CPUS_PER_TASK:-unset} ntasks=$SLURM_NTASKS']));"
        " print('child-job', s.job_id)"
    )
    parent = submit(
        dev_site,
        _req(
            name="parent",
            cpus_per_task=2,
            ntasks_per_node=2,
            launcher="none",
            command=[dev_site.python, "-c", inner],
        ),
    )
    sched = get_scheduler(dev_site)
    assert sched.wait([parent.job_id], timeout=WAIT)[parent.job_id].state is JobState.COMPLETED
    log = parent.run_dir.log_file().read_text()
    child_id = log.split("child-job ")[1].split()[0]
    assert sched.wait([child_id], timeout=WAIT)[child_id].state is JobState.COMPLETED
    from aimass_hpc.launch.runs import find_run

    child_log = find_run(child_id, dev_site.runs_root).log_file().read_text()
    assert "child cpus=unset ntasks=1" in child_log


SITES = sorted(p.stem for p in BUNDLED_SITES.glob("*.toml"))


@pytest.mark.parametrize("site_name", SITES)
def test_rendered_scripts_pass_sbatch_test_only(cluster, tmp_path, site_name):
    """Every template on every bundled site; non-dev sites get the dev cluster's partition."""
    dev = load_site("dev")
    site = load_site(site_name)
    if site_name != "dev":
        site = site.model_copy(
            update={
                "partitions": {"debug": dev.partition("debug")},
                "account": None,
                "qos": None,
                "constraints": [],
                "training": site.training.model_copy(update={"partition": None}),
                "search": site.search.model_copy(update={"partition": None}),
                "serving": site.serving.model_copy(
                    update={"partition": None, "default_reservation": None}
                ),
            }
        )
        if site.scheduler == "local":
            site = site.model_copy(update={"scheduler": "slurm"})
    sched = get_scheduler(dev)
    for template in TEMPLATE_NAMES:
        kind = template.removesuffix(".j2")
        request = JobRequest(
            kind=kind,
            name=f"test-only-{kind}",
            command=["true"],
            nodes=2 if site_name != "local" else 1,
            ntasks_per_node=2,
            gpus_per_node=2,
            time="10",
            array="0-3%2",
            requeue=site_name != "local",
            template_vars={"trial_id": 1},
        )
        path = tmp_path / f"{kind}.sh"
        path.write_text(render_request(site, request, tmp_path / "run"))
        message = sched.test_submit(path, run_dir=tmp_path)
        assert "to start at" in message, message


NASTY_PATH = "runs %j %x \\ \"dq\" 'sq' $(touch CANARY) `touch CANARY` ; & | * ü\nnewline"


def test_adversarial_values_reach_a_multi_node_job_byte_for_byte(cluster, tmp_path):
    from test_render_quoting import NASTY

    canary = tmp_path / "canary"
    values = [v.replace("CANARY", str(canary)) for v in NASTY]
    site = write_site(tmp_path, "dev", runs=tmp_path / NASTY_PATH.replace("CANARY", "canary2"))
    workdir = tmp_path / "work $(touch canary3) 'x' \"y\" \\ %j ü"
    workdir.mkdir()
    dump = (
        "import json, os, sys; "
        "json.dump({'argv': sys.argv[1:], 'env': {k: v for k, v in os.environ.items() "
        "if k.startswith('NASTY_')}, 'name': os.environ['AIMASS_JOB_NAME'], 'cwd': os.getcwd(),"
        " 'run_dir': os.environ['AIMASS_RUN_DIR']}, open(os.path.join(os.environ['AIMASS_RUN_DIR'],"
        " 'out-' + os.environ['SLURM_PROCID'] + '.json'), 'w'))"
    )
    request = JobRequest(
        name=" ".join(values[:10]),
        command=[site.python, "-c", dump, *values],
        env={f"NASTY_{i}": v for i, v in enumerate(values)},
        workdir=str(workdir),
        nodes=2,
        time="5",
    )
    sub = submit(site, request)
    final = get_scheduler(site).wait([sub.job_id], timeout=WAIT)[sub.job_id]
    assert final.state is JobState.COMPLETED, final
    for rank in (0, 1):
        got = json.loads((sub.run_dir.path / f"out-{rank}.json").read_text(encoding="utf-8"))
        assert got["argv"] == values
        assert got["env"] == {f"NASTY_{i}": v for i, v in enumerate(values)}
        assert got["name"] == request.name
        assert got["cwd"] == str(workdir)
        assert got["run_dir"] == str(sub.run_dir.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [workdir.name, site.runs_root.name, "site-dev.toml"]
    )
    assert sub.run_dir.batch_logs()  # Slurm's own output file landed in the odd path too


def test_a_job_whose_id_was_never_recorded_is_found_by_its_run_dir(cluster, dev_site):  # noqa: F811
    """The submitter dies while sbatch runs: the job is queued, its id is recorded nowhere."""
    from aimass_hpc.launch.scheduler.slurm import SlurmScheduler

    class DiesAfterSbatch(SlurmScheduler):
        def submit(self, *args, **kwargs):
            self.queued = super().submit(*args, **kwargs)
            raise KeyboardInterrupt  # stands in for SIGKILL: nothing after sbatch runs

    dying = DiesAfterSbatch()
    with pytest.raises(KeyboardInterrupt):
        submit(dev_site, _req(name="orphan", command=["sleep", "30"]), scheduler=dying)
    orphan_dir = max(dev_site.runs_root.iterdir(), key=lambda p: p.stat().st_mtime)
    sched = get_scheduler(dev_site)
    try:
        assert sched.find_jobs_for_run(orphan_dir) == [dying.queued]
        assert sched.find_jobs_for_run(dev_site.runs_root) == []
    finally:
        sched.cancel([dying.queued])


def test_a_finished_job_is_found_by_its_run_dir_in_accounting(cluster, dev_site):  # noqa: F811
    """squeue forgets ended jobs after MinJobAge; sacct still knows where they ran."""
    from aimass_hpc.launch.scheduler.slurm import SlurmScheduler

    sub = submit(dev_site, _req(name="gone", command=["true"]))
    sched = SlurmScheduler()
    assert sched.wait([sub.job_id], timeout=WAIT)[sub.job_id].state is JobState.COMPLETED
    deadline = time.monotonic() + 30  # slurmdbd records the job a moment after it ends
    while time.monotonic() < deadline:
        found = sched.jobs_in_accounting(sub.run_dir.path.resolve())
        if found:
            break
        time.sleep(0.5)
    assert found == [sub.job_id]
    assert sched.jobs_in_accounting(dev_site.runs_root.resolve()) == []


def test_sbatch_timeout_comes_from_the_environment(monkeypatch):
    from aimass_hpc.common.errors import InputError
    from aimass_hpc.launch.scheduler.slurm import sbatch_timeout

    monkeypatch.delenv("AIMASS_SBATCH_TIMEOUT", raising=False)
    assert sbatch_timeout() == 60.0
    monkeypatch.setenv("AIMASS_SBATCH_TIMEOUT", "2.5")
    assert sbatch_timeout() == 2.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        monkeypatch.setenv("AIMASS_SBATCH_TIMEOUT", bad)
        with pytest.raises(InputError, match="AIMASS_SBATCH_TIMEOUT"):
            sbatch_timeout()
