"""common.slurm_cli: the one home of Slurm command-line facts (scrubbed env, sbatch output,
scontrol requeue, signal names). Pure logic here; the cluster tests talk to the real daemons."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from aimass_hpc.common import slurm_cli
from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError, SchedulerError

# ---------------------------------------------------------------------------- environment

PARENT_JOB = {
    "SLURM_JOB_ID": "41",
    "SLURM_NTASKS": "4",
    "SLURM_CPUS_PER_TASK": "2",
    "SBATCH_PARTITION": "big",
    "SRUN_CPUS_PER_TASK": "2",
    "SALLOC_ACCOUNT": "x",
    "SLURM_CONF": "/etc/slurm/slurm.conf",
    "SLURMD_NODENAME": "node1",  # not a submission default: kept
    "PATH": "/usr/bin",
}


def test_inside_a_job_the_allocation_is_scrubbed_and_slurm_conf_kept() -> None:
    env = slurm_cli.submission_env(environ=PARENT_JOB)
    assert env == {
        "SLURM_CONF": "/etc/slurm/slurm.conf",
        "SLURMD_NODENAME": "node1",
        "PATH": "/usr/bin",
    }


def test_the_older_jobid_variable_also_means_inside_a_job() -> None:
    env = {"SLURM_JOBID": "41", "SBATCH_ACCOUNT": "a", "HOME": "/h"}
    assert slurm_cli.in_job(env) and slurm_cli.submission_env(environ=env) == {"HOME": "/h"}


def test_outside_a_job_nothing_is_removed_and_extra_comes_last() -> None:
    login = {"SBATCH_ACCOUNT": "mine", "SLURM_CONF": "/c", "PATH": "/bin"}
    assert not slurm_cli.in_job(login)
    assert slurm_cli.submission_env(environ=login) == login
    env = slurm_cli.submission_env({"SLURM_NTASKS": "1", "X": "y"}, environ=PARENT_JOB)
    assert env["SLURM_NTASKS"] == "1" and env["X"] == "y" and "SBATCH_PARTITION" not in env


def test_the_default_environment_is_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SBATCH_QOS", "q")
    monkeypatch.setenv("AIMASS_KEEP", "1")
    env = slurm_cli.submission_env()
    assert "SLURM_JOB_ID" not in env and "SBATCH_QOS" not in env and env["AIMASS_KEEP"] == "1"


# ------------------------------------------------------------------------------- job ids


@pytest.mark.parametrize(
    ("stdout", "reply"),
    [
        ("123\n", ("123", None)),
        ("123", ("123", None)),
        ("  123  \n", ("123", None)),
        ("123;cluster_a\n", ("123", "cluster_a")),
        ("sbatch: a note\n456\n", ("456", None)),  # the id is the last line
    ],
)
def test_sbatch_parsable_output(stdout: str, reply: tuple[str, str | None]) -> None:
    assert slurm_cli.parse_sbatch_parsable(stdout) == reply


@pytest.mark.parametrize(
    "stdout",
    [
        None,
        "",
        "\n",
        "Submitted batch job 123",
        "abc",
        "²",  # str.isdigit() says yes
        "١٢٣",  # Arabic-Indic digits: \d and int() say yes
        "123_4",
        "-1",
        "12 3",
        "123abc",
        "123;",
        "123;a;b",
        "123;a b",
    ],
)
def test_sbatch_output_without_a_plain_ascii_id_is_refused(stdout: str | None) -> None:
    with pytest.raises(SchedulerError, match="^sbatch printed no job id: "):
        slurm_cli.parse_sbatch_parsable(stdout)


def test_job_ids_and_refs_are_ascii_digits_fully_matched() -> None:
    assert slurm_cli.is_job_id("123") and slurm_cli.is_job_ref("123")
    assert slurm_cli.is_job_ref("123_4") and not slurm_cli.is_job_id("123_4")
    for bad in ["", "123\n", "\n123", " 123", "²", "١", "12_", "_1", "1_2_3", "1.batch", None, 5]:
        assert not slurm_cli.is_job_id(bad) and not slurm_cli.is_job_ref(bad), bad  # type: ignore[arg-type]


def test_digits_or_none() -> None:
    assert slurm_cli.digits_or_none(" 12\n") == 12 and slurm_cli.digits_or_none("0") == 0
    for bad in [None, "", "²", "١", "1_0", "-1", "+1", "1.0", "x"]:
        assert slurm_cli.digits_or_none(bad) is None, bad


def test_sbatch_parsable_argv() -> None:
    argv = slurm_cli.sbatch_parsable_argv("/r/job.sh", ["--array=3"])
    assert argv == ["sbatch", "--parsable", "--array=3", "/r/job.sh"]


# ------------------------------------------------------------------------------ commands


def test_error_line_is_the_last_line_said() -> None:
    assert slurm_cli.error_line("a\nscontrol: error: b\n\n", "out") == "scontrol: error: b"
    assert slurm_cli.error_line("", "only stdout\n") == "only stdout"
    assert slurm_cli.error_line(None, None) == "no output"


def test_requeue_argv_takes_ids_and_array_tasks_only() -> None:
    assert slurm_cli.requeue_argv("12") == ["scontrol", "requeue", "12"]
    assert slurm_cli.requeue_argv("12_3", "/opt/scontrol") == ["/opt/scontrol", "requeue", "12_3"]
    for bad in ["", "12\n", "--help", "12,13", "²"]:
        with pytest.raises(InputError, match="^job id: "):
            slurm_cli.requeue_argv(bad)


def test_what_a_failed_requeue_means() -> None:
    unknown = slurm_cli.requeue_error("9", "scontrol: error: Invalid job id specified")
    assert isinstance(unknown, NotFoundError) and str(unknown) == "unknown job id: 9"
    refused = slurm_cli.requeue_error("9", "scontrol: error: Job has already finished")
    assert isinstance(refused, ConflictError)
    assert str(refused) == "cannot requeue job 9: scontrol: error: Job has already finished"


def test_a_missing_tool_is_one_scheduler_error(tmp_path: Path) -> None:
    with pytest.raises(SchedulerError, match="command not found"):
        slurm_cli.scontrol_requeue("1", scontrol=str(tmp_path / "no-scontrol"))
    with pytest.raises(SchedulerError, match="did not answer within 1s"):
        slurm_cli.run_command([sys.executable, "-c", "import time; time.sleep(30)"], timeout=1)
    not_executable = tmp_path / "scontrol"
    not_executable.write_text("#!/bin/sh\n")
    with pytest.raises(SchedulerError, match="Permission denied"):
        slurm_cli.run_command([str(not_executable)])


# ------------------------------------------------------------------------------- signals


@pytest.mark.parametrize(
    "name", ["USR1", "usr1", "SIGUSR1", " SIGUSR1 ", "B:USR1", "b:SIGUSR1", "10", "B:10", 10]
)
def test_every_spelling_of_the_warning_signal(name: str | int) -> None:
    assert slurm_cli.parse_signal(name) == signal.SIGUSR1


def test_other_signals_and_real_time_numbers() -> None:
    assert slurm_cli.parse_signal("TERM") == signal.SIGTERM
    assert slurm_cli.parse_signal("HUP") == signal.SIGHUP
    rt = int(signal.SIGRTMIN) + 2  # a real-time signal: a number without a Signals member
    assert slurm_cli.parse_signal(str(rt)) == rt and slurm_cli.signal_name(rt) == str(rt)
    assert slurm_cli.signal_name(signal.SIGUSR1) == "SIGUSR1"


@pytest.mark.parametrize("name", ["", "B:", "FOO", "SIGFOO", "0", "99", "²", "١٠", "-10", True, 0])
def test_unknown_signals_are_refused(name: str | int) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        slurm_cli.parse_signal(name)


# ---------------------------------------------------------------------------- this job


def test_job_ref_and_restart_count_from_the_environment() -> None:
    assert slurm_cli.job_ref_from_env({}) is None
    assert slurm_cli.job_ref_from_env({"SLURM_JOB_ID": "5"}) == "5"
    array = {"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "5", "SLURM_ARRAY_TASK_ID": "2"}
    assert slurm_cli.job_ref_from_env(array) == "5_2"
    assert slurm_cli.restart_count_from_env({}) == 0
    assert slurm_cli.restart_count_from_env({"SLURM_RESTART_COUNT": "3"}) == 3
    assert slurm_cli.restart_count_from_env({"SLURM_RESTART_COUNT": "²"}) == 0


def test_the_job_side_can_import_it_without_the_login_side() -> None:
    code = (
        "import sys, aimass_hpc.common.slurm_cli;"
        " bad = [m for m in sys.modules if m.startswith('aimass_hpc.')"
        " and not m.startswith('aimass_hpc.common')];"
        " heavy = [m for m in ('torch', 'numpy', 'pydantic') if m in sys.modules];"
        " print(bad, heavy); sys.exit(1 if bad or heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- the cluster


@pytest.mark.cluster
def test_requeue_of_an_id_the_controller_does_not_know(cluster) -> None:
    with pytest.raises(NotFoundError, match="^unknown job id: 999999999$"):
        slurm_cli.scontrol_requeue("999999999")


@pytest.mark.cluster
def test_the_handover_resubmits_one_array_task_without_the_parent_allocation(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a serve replica does on its warning, from a (pretend) parent job's environment:
    unscrubbed, ``SBATCH_PARTITION`` would make sbatch refuse and the parent's
    ``SLURM_CPUS_PER_TASK`` would reach the replacement."""
    from aimass_hpc.launch.scheduler import JobState
    from aimass_hpc.launch.scheduler.slurm import SlurmScheduler
    from aimass_hpc.serve.handover import submit_replacement

    (tmp_path / "job.sh").write_text(
        "#!/bin/bash\n#SBATCH --time=2\n#SBATCH --output=out-%a.txt\n"
        'echo "task=$SLURM_ARRAY_TASK_ID cpus=${SLURM_CPUS_PER_TASK:-unset}"\n'
    )
    parent = {"SLURM_JOB_ID": "41", "SLURM_CPUS_PER_TASK": "2", "SBATCH_PARTITION": "no-such"}
    with monkeypatch.context() as inside:
        for key, value in parent.items():
            inside.setenv(key, value)
        ref = submit_replacement(str(tmp_path), "3")
    base, _, task = ref.partition("_")
    assert slurm_cli.is_job_id(base) and task == "3"
    final = SlurmScheduler().wait([base], timeout=180)[base]
    assert final.state is JobState.COMPLETED, final
    assert (tmp_path / "out-3.txt").read_text() == "task=3 cpus=unset\n"
