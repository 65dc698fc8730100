"""Integration tests of the local Slurm cluster that scripts/dev-cluster brings up.

They run real srun/sbatch/sacct against the real slurmctld/slurmd/slurmdbd daemons: the
nodes and fake GPUs, accounting, PMIx launches of Open MPI programs across nodes, Horovod,
GPU binding through gres, and how quickly a requeued job starts again.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NODES = ("node1", "node2", "node3")
USABLE_STATES = {"IDLE", "MIXED", "ALLOCATED", "COMPLETING"}
# Open MPI over loopback on this host: the shared-memory BTL (vader) crashes here, so ranks talk
# TCP over lo, and the out-of-band channel stays on lo too.
MPI_ENV = {
    "OMPI_MCA_btl": "self,tcp",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMP_NUM_THREADS": "1",
}

pytestmark = pytest.mark.cluster


def run(cmd: list[str], *, timeout: float = 120, env: dict[str, str] | None = None) -> str:
    """Run a Slurm command and return its stdout; fail the test with its stderr otherwise."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr}"
    return proc.stdout


def node_info(name: str) -> dict[str, str]:
    """``scontrol show node -o NAME`` as a dict of its KEY=VALUE fields."""
    line = run(["scontrol", "show", "node", "-o", name]).strip()
    return dict(re.findall(r"(\w+)=(\S*)", line))


def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job -o ID`` as a dict of its KEY=VALUE fields."""
    line = run(["scontrol", "show", "job", "-o", job_id]).strip()
    return dict(re.findall(r"(\w+)=(\S*)", line))


def srun(args: list[str], *, timeout: float = 180) -> list[str]:
    """A blocking srun (a 5-minute job limit so nothing outlives a broken test); output lines."""
    out = run(["srun", "--time=5", "--quiet", *args], timeout=timeout, env=MPI_ENV)
    return [line for line in out.splitlines() if line.strip()]


def test_env_and_status(cluster: dict[str, str]) -> None:
    """`env` exports SLURM_CONF under the cluster directory; `status` says the cluster is up."""
    conf = Path(cluster["SLURM_CONF"])
    assert conf.name == "slurm.conf" and conf.is_file()
    assert not str(conf).startswith("/etc/slurm")
    out = run([str(ROOT / "scripts" / "dev-cluster"), "status"])
    assert "cluster is up" in out
    for node in NODES:
        assert node in out


def test_three_nodes_with_four_fake_gpus(cluster: dict[str, str]) -> None:
    """node1..node3 are usable in partition debug, each with 8 CPUs and gres gpu:fake:4."""
    for name in NODES:
        info = node_info(name)
        states = set(info["State"].split("+"))
        assert states & USABLE_STATES and not states & {"DOWN", "DRAIN", "INVAL"}, info["State"]
        assert info["Gres"] == "gpu:fake:4"
        assert int(info["CPUTot"]) >= 8
        assert info["Partitions"] == "debug"
    default = run(["sinfo", "-h", "-o", "%P"]).split()
    assert "debug*" in default


def test_node_names_resolve(cluster: dict[str, str]) -> None:
    """The node names resolve to loopback (torch's MASTER_ADDR may use them)."""
    import socket

    for name in NODES:
        assert socket.gethostbyname(name) == "127.0.0.1"


def test_sacct_reports_a_finished_job(cluster: dict[str, str], tmp_path: Path) -> None:
    """Accounting goes through slurmdbd: sacct shows a finished job's state and exit code."""
    job_id = run(["sbatch", "--parsable", "-o", str(tmp_path / "out"), "--wrap", "exit 3"]).strip()
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        out = run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"]).strip()
        if out and out.split("|")[0] not in {"PENDING", "RUNNING", "COMPLETING"}:
            state = out
            break
        time.sleep(0.5)
    assert state == "FAILED|3:0"
    # Finished jobs stay visible to squeue/scontrol for a while (MinJobAge).
    assert job_info(job_id)["JobState"] == "FAILED"


def test_gres_binds_fake_gpus(cluster: dict[str, str]) -> None:
    """A job asking gres gpu:2 gets two GPUs bound through CUDA_VISIBLE_DEVICES."""
    lines = srun(["-N1", "-n1", "--gres=gpu:2", "printenv", "CUDA_VISIBLE_DEVICES"])
    assert len(lines) == 1
    assert len(lines[0].split(",")) == 2


def test_mpi4py_allreduce_across_nodes_with_pmix(cluster: dict[str, str]) -> None:
    """srun --mpi=pmix launches Open MPI ranks on 2 nodes x 2 tasks that allreduce together."""
    code = (
        "import os; from mpi4py import MPI; c = MPI.COMM_WORLD; "
        "print(c.rank, c.size, os.environ['SLURMD_NODENAME'], c.allreduce(c.rank + 1))"
    )
    lines = srun(["--mpi=pmix", "-N2", "--ntasks-per-node=2", sys.executable, "-c", code])
    rows = sorted(line.split() for line in lines)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert {r[1] for r in rows} == {"4"}
    assert len({r[2] for r in rows}) == 2
    assert {r[3] for r in rows} == {"10"}


@pytest.mark.horovod
def test_horovod_allreduce_across_nodes(cluster: dict[str, str]) -> None:
    """horovod.torch (MPI controller) allreduces across 2 nodes x 2 ranks under srun."""
    code = (
        "import os, torch, horovod.torch as hvd; hvd.init(); "
        "t = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum); "
        "print(hvd.rank(), hvd.size(), hvd.local_rank(), os.environ['SLURMD_NODENAME'], "
        "int(t.item()), hvd.mpi_enabled())"
    )
    lines = srun(["--mpi=pmix", "-N2", "--ntasks-per-node=2", sys.executable, "-c", code])
    rows = sorted(line.split() for line in lines if line[0].isdigit())
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert {r[1] for r in rows} == {"4"}
    assert sorted(r[2] for r in rows) == ["0", "0", "1", "1"]
    assert len({r[3] for r in rows}) == 2
    assert {r[4] for r in rows} == {"10"}
    assert {r[5] for r in rows} == {"True"}


def test_requeued_job_runs_again_soon(cluster: dict[str, str], tmp_path: Path) -> None:
    """scontrol requeue puts a job back, and Slurm's requeue hold is short on this cluster.

    Slurm makes a requeued batch job wait AuthInfo cred_expire + 1 seconds (120 s by default);
    the dev cluster shortens it so preemption tests do not idle for minutes.
    """
    marker = tmp_path / "runs"
    script = f"echo run ${{SLURM_RESTART_COUNT:-0}} >> {marker}; sleep 300"
    job_id = run(
        ["sbatch", "--parsable", "--requeue", "-t", "10", "-o", "/dev/null", "--wrap", script]
    ).strip()
    try:
        _wait_for(lambda: marker.exists() and "run 0" in marker.read_text(), 60)
        run(["scontrol", "requeue", job_id])
        _wait_for(lambda: "run 1" in marker.read_text(), 120)
        info = job_info(job_id)
        assert info["Restarts"] == "1"
        submit = datetime.fromisoformat(info["SubmitTime"])
        eligible = datetime.fromisoformat(info["EligibleTime"])
        assert (eligible - submit).total_seconds() <= 30
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)


def _wait_for(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.3)
