"""Job templates: what the rendered scripts say, shellcheck-clean on every site, and the
validation a request gets against its site."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from _sitefixtures import write_site

from aimass_hpc.common.errors import InputError
from aimass_hpc.config.job_spec import JobRequest, load_job_spec, slurm_job_name
from aimass_hpc.config.site import BUNDLED_SITES, load_site
from aimass_hpc.launch.render import TEMPLATE_NAMES, render_request
from aimass_hpc.launch.runs import RunDir

SITES = sorted(p.stem for p in BUNDLED_SITES.glob("*.toml"))
KINDS = [t.removesuffix(".j2") for t in TEMPLATE_NAMES]


def request_for(site, kind: str, **fields) -> JobRequest:
    """A typical multi-node GPU request sized to the site's default partition."""
    part = site.default_partition
    base = dict(
        kind=kind,
        name=f"t-{kind}",
        command=["python3", "-m", "aimass_hpc.runtime", kind, "--config", "a b.json"],
        nodes=1 if site.scheduler == "local" else 2,
        ntasks_per_node=2 if site.scheduler != "local" else 1,
        gpus_per_node=part.gpus_per_node,
        env={"SPACED": "a b", "QUOTED": 'it\'s "x"'},
        template_vars={"trial_id": 3, "study": "s1", "model": "m@prod"},
    )
    base.update(fields)
    return JobRequest(**base)


@pytest.mark.parametrize("site_name", SITES)
@pytest.mark.parametrize("kind", KINDS)
def test_every_template_on_every_site_passes_shellcheck(tmp_path, site_name, kind):
    site = load_site(site_name)
    script = render_request(site, request_for(site, kind), tmp_path / "run dir")
    path = tmp_path / "job.sh"
    path.write_text(script, encoding="utf-8")
    proc = subprocess.run(["shellcheck", "-s", "bash", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_sbatch_header_carries_every_controlled_option():
    site = load_site("dev")
    script = render_request(
        site,
        request_for(
            site,
            "job",
            array="0-9%2",
            dependency="afterok:11:12",
            requeue=True,
            reservation="resv1",
            cpus_per_task=2,
            mem="2G",
            time="90",
            sbatch_extra=["--mail-type=END", "--exclusive"],
        ),
        "/runs/x",
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --gres=gpu:fake:4",
        "#SBATCH --array=0-9%2",
        "#SBATCH --dependency=afterok:11:12",
        "#SBATCH --requeue",
        "#SBATCH --reservation=resv1",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --mem=2G",
        "#SBATCH --time=01:30:00",
        "#SBATCH --partition=debug",
        "#SBATCH --signal=USR1@30",
        "#SBATCH --mail-type=END",
        "#SBATCH --exclusive",
        "#SBATCH --output=logs/slurm-%A_%a.out",
    ]:
        assert line in script.splitlines(), line


def test_multi_node_launch_line():
    site = load_site("dev")
    script = render_request(site, request_for(site, "job"), "/runs/x")
    assert "srun --kill-on-bad-exit=1 --wait=30 --mpi=pmix \\" in script
    assert "python3 -m aimass_hpc.runtime job --config 'a b.json'" in script
    # A job that uses no MPI (mpi = false in its spec) starts its tasks without the plugin.
    no_mpi = render_request(site, request_for(site, "job", mpi=False), "/runs/x")
    assert "srun --kill-on-bad-exit=1 --wait=30 \\" in no_mpi and "--mpi" not in no_mpi


def test_launcher_none_runs_a_child_and_signals_the_batch_shell():
    site = load_site("dev")
    script = render_request(site, request_for(site, "job", launcher="none"), "/runs/x")
    assert "#SBATCH --signal=B:USR1@30" in script
    assert "\npython3 -m aimass_hpc.runtime job --config 'a b.json' &\n" in script
    assert 'trap \'kill -s USR1 "$aimass_child"' in script
    assert "srun " not in script


def _run_batch_shell(tmp_path, command, *, signal_after=None, restart="0"):
    """Render a launcher-none job for the local site and run it with bash as Slurm would."""
    site = write_site(tmp_path, "local")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    request = JobRequest(name="x", command=command, launcher="none", signal=False)
    script = render_request(site, request, run_dir)
    (run_dir / "job.sh").write_text(script)
    env = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": restart}
    proc = subprocess.Popen(["bash", str(run_dir / "job.sh")], env=env, cwd=run_dir)
    if signal_after is not None:
        deadline = time.monotonic() + 30
        while not (run_dir / "ready").exists():
            assert time.monotonic() < deadline, "the command never started"
            time.sleep(0.05)
        proc.send_signal(signal_after)  # to the batch shell only, as --signal=B: does
    rc = proc.wait(timeout=60)
    return rc, run_dir


def test_the_exit_record_says_how_the_command_ended(tmp_path):
    rc, run_dir = _run_batch_shell(tmp_path, ["bash", "-c", "exit 3"])
    assert rc == 3
    record = json.loads((run_dir / "logs" / "exit-restart-0.json").read_text())
    assert record == {**record, "job_id": "77", "restart": 0, "exit_code": 3}
    assert RunDir(run_dir).exit_record()["exit_code"] == 3
    assert not list((run_dir / "logs").glob("*.tmp.*"))  # written by rename


def test_the_warning_signal_reaches_the_command_through_the_batch_shell(tmp_path):
    child = (
        "trap 'echo got-usr1 > warned; exit 0' USR1; touch ready; "
        "for i in $(seq 600); do sleep 0.1; done; exit 9"
    )
    rc, run_dir = _run_batch_shell(tmp_path, ["bash", "-c", child], signal_after=signal.SIGUSR1)
    assert rc == 0
    assert (run_dir / "warned").read_text() == "got-usr1\n"
    assert RunDir(run_dir).exit_record()["exit_code"] == 0


def test_only_the_latest_restart_exit_record_counts(tmp_path):
    rc, run_dir = _run_batch_shell(tmp_path, ["bash", "-c", "exit 1"])
    assert rc == 1
    (run_dir / "logs" / "restart-1.log").write_text("aimass: job 77 restart 1\n")
    assert RunDir(run_dir).exit_record() is None  # restart 1 is running: no verdict yet


def test_gpus_per_node_style_and_site_defaults():
    site = load_site("example-hpc")
    script = render_request(
        site, request_for(site, "train", partition="h100", gpus_per_node=8), "/runs/x"
    )
    assert "#SBATCH --gres=gpu:h100:8" in script
    assert "#SBATCH --account=ai-research" in script
    assert "#SBATCH --qos=gpu" in script  # partition QOS beats the site QOS
    assert "#SBATCH --time=04:00:00" in script  # partition default_time
    assert "module load gcc/12.2.0 openmpi/4.1.5 cuda/12.4 apptainer/1.3" in script
    assert "apptainer exec --nv --bind /lustre:/lustre" in script
    assert "lfs setstripe -c 4 -S 4M" in script
    assert "export NCCL_IB_HCA=mlx5" in script


def test_mpirun_launcher(tmp_path):
    site = write_site(
        tmp_path,
        "dev",
        mpi={"launcher": "mpirun", "srun_mpi": "none", "mpirun_args": ["--bind-to", "none"]},
    )
    script = render_request(site, request_for(site, "job"), "/runs/x")
    assert 'mpirun -np "${SLURM_NTASKS:-1}" --bind-to none \\' in script


def test_train_template_exports_rendezvous():
    site = load_site("dev")
    script = render_request(site, request_for(site, "train"), "/runs/x")
    assert "scontrol show node -o" in script and "NodeAddr" in script
    assert "export MASTER_PORT=$((20000 + ${SLURM_JOB_ID:-0} % 20000))" in script
    assert "export AIMASS_TRAIN_BACKEND=torch" in script


def test_trial_and_serve_templates_export_their_vars():
    site = load_site("dev")
    trial = render_request(site, request_for(site, "trial"), "/runs/x")
    assert "export AIMASS_TRIAL_ID=3" in trial and "export AIMASS_STUDY=s1" in trial
    serve = render_request(site, request_for(site, "serve"), "/runs/x")
    assert "export AIMASS_SERVE_MODEL=m@prod" in serve
    assert "export AIMASS_PORT_MIN=21000" in serve
    assert 'export AIMASS_ENDPOINTS_DIR="$AIMASS_RUN_DIR/endpoints"' in serve


def test_job_exports_run_dir_and_exact_name_and_logs_per_restart():
    site = load_site("dev")
    script = render_request(site, request_for(site, "job", name="my job; ünïcode"), "/runs/x y")
    assert "export AIMASS_RUN_DIR='/runs/x y'" in script
    assert "export AIMASS_JOB_NAME='my job; ünïcode'" in script
    assert "#SBATCH --job-name=my_job___n_code" in script
    assert 'restart-${SLURM_RESTART_COUNT:-0}.log" 2>&1' in script
    assert "cd -- '/runs/x y'" in script


def test_request_validation_names_the_field():
    site = load_site("dev")
    cases = {
        "partition": dict(partition="gpu"),
        "gpus_per_node": dict(gpus_per_node=5),
        "time": dict(time="2-00:00:00"),
        "nodes": dict(nodes=4),
        "cpus_per_task": dict(cpus_per_task=8),
    }
    for field, change in cases.items():
        with pytest.raises(InputError, match=rf"^{field}: "):
            render_request(site, request_for(site, "job", **change))


def test_request_value_checks():
    bad = [
        dict(time="soon"),
        dict(mem="lots"),
        dict(array="0-9%"),
        dict(dependency="after:me"),
        dict(env={"1BAD": "x"}),
        dict(partition="a b"),
        dict(command=[]),
        dict(sbatch_extra=["--time=5"]),
        dict(sbatch_extra=["--comment=a b"]),
        dict(sbatch_extra=["-x"]),
        dict(kind="other"),
        dict(nodes=0),
        dict(gpus_per_node=-1),
    ]
    for change in bad:
        with pytest.raises(ValueError):
            JobRequest(**{"name": "x", "command": ["true"], **change})


def test_local_site_refuses_srun_and_requeue():
    site = load_site("local")
    with pytest.raises(InputError, match="^launcher: "):
        render_request(site, request_for(site, "job", launcher="srun"))
    with pytest.raises(InputError, match="^requeue: "):
        render_request(site, request_for(site, "job", requeue=True))


def test_slurm_job_name_is_safe():
    assert slurm_job_name("a b$(c)") == "a_b__c_"
    assert slurm_job_name("---") == "job"


def test_job_spec_file(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('[job]\nname = "x"\ncommand = ["true"]\nnodes = 2\n', encoding="utf-8")
    assert load_job_spec(spec).nodes == 2
    spec.write_text('[job]\nnmae = "x"\ncommand = ["true"]\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"job\.nmae: unknown key \(did you mean 'name'\?\)"):
        load_job_spec(spec)
    spec.write_text('[job]\nname = "x"\ncommand = "echo hi"\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"job\.command: give a list"):
        load_job_spec(spec)
    spec.write_text('[jbo]\nname = "x"\n', encoding="utf-8")
    with pytest.raises(InputError, match="did you mean 'job'"):
        load_job_spec(spec)


def test_bundled_example_renders():
    from aimass_hpc.config.site import PACKAGE_ROOT

    request = load_job_spec(PACKAGE_ROOT / "examples" / "hello" / "hello.toml")
    script = render_request(load_site("dev"), request, "/runs/x")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gres=gpu:fake:2" in script


def test_kind_defaults_come_from_the_site():
    site = load_site("example-hpc")
    # CPU-only training is kept off GPU partitions (tests/test_site_overrides.py): ask for GPUs.
    train = JobRequest(kind="train", name="t", command=["true"], gpus_per_node=8).resolve(site)
    serve = JobRequest(kind="serve", name="s", command=["true"]).resolve(site)
    job = JobRequest(name="j", command=["true"]).resolve(site)
    assert (train.partition, serve.partition, job.partition) == ("h100", "a100", "a100")
    assert serve.reservation == "inference" and job.reservation is None
    assert train.resolve(site) == train  # idempotent


def test_a_request_is_resolved_once_and_checked_again_after_a_change():
    site = load_site("dev")
    resolved = JobRequest(name="x", command=["true"]).resolve(site)
    assert resolved.resolve(site) is resolved  # resolve once: no second check
    changed = resolved.model_copy(update={"gpus_per_node": 99})
    with pytest.raises(InputError, match="^gpus_per_node: "):
        changed.resolve(site)  # a changed request is checked again
