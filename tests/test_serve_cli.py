"""``aimass serve|endpoints|bench|reserve`` without a cluster: dry runs, checks, messages.

Specification: ``aimass serve REF --dry-run`` checks the model (exists, has a servable recipe)
and prints a job-array script that runs ``python -m aimass_hpc.serve`` in the reservation,
with the warning signal and requeue set; bad refs and bad options fail with one line and
the documented exit code; scontrol's failures become one-line messages naming the cause.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.cli.reserve import explain_failure, parse_reservations
from aimass_hpc.common.errors import ConflictError, NotFoundError, SchedulerError
from aimass_hpc.launch.serving import service_options
from aimass_hpc.repo import ModelRepository
from aimass_hpc.serve import toymodels


def aimass(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def site_file(tmp_path: Path) -> str:
    site = write_site(tmp_path, "dev")
    repo = ModelRepository(site.models_root)
    kwargs = {"in_features": 4, "hidden": 4, "out_features": 1}
    net = toymodels.mlp(**kwargs)
    repo.save("toy", net.state_dict(), recipe=toymodels.recipe(**kwargs))
    repo.promote("toy", 1, "prod")
    repo.save("norecipe", torch.nn.Linear(2, 1).state_dict())
    return str(site.source)


def test_dry_run_prints_a_job_array_script(site_file: str) -> None:
    proc = aimass(
        "serve", "toy@prod", "--site", site_file, "--replicas", "3", "--reservation", "gpu-res",
        "--time", "01:00:00", "--gpus", "1", "--dry-run",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in (
        "#SBATCH --array=0-2",
        "#SBATCH --reservation=gpu-res",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@30",
        "#SBATCH --time=01:00:00",
        "#SBATCH --cpus-per-task=2",
        "#SBATCH --gres=gpu:fake:1",
        "export AIMASS_SERVE_MODEL=toy@prod",
        "-m aimass_hpc.serve",
    ):
        assert line in script, line
    out = aimass("serve", "start", "toy@prod", "--site", site_file, "--dry-run", "--json")
    assert json.loads(out.stdout)["dry_run"] is True


@pytest.mark.parametrize(
    ("ref", "code", "words"),
    [
        ("nope@prod", 3, "nope"),
        ("toy@staging", 3, "staging"),
        ("norecipe:1", 2, "recipe"),
        ("bad name", 2, "invalid"),
    ],
)
def test_bad_refs_fail_before_anything_is_queued(
    site_file: str, tmp_path: Path, ref: str, code: int, words: str
) -> None:
    proc = aimass("serve", ref, "--site", site_file, "--dry-run")
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith("aimass: error:") and words in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_bad_options_name_the_field(site_file: str) -> None:
    proc = aimass("serve", "toy@prod", "--site", site_file, "--gpus", "9", "--dry-run")
    assert proc.returncode == 2 and "gpus_per_node" in proc.stderr
    proc = aimass("serve", "toy@prod", "--site", site_file, "--time", "soon", "--dry-run")
    assert proc.returncode == 2 and "time" in proc.stderr


def test_endpoints_and_stop_on_an_empty_runs_root(site_file: str) -> None:
    proc = aimass("endpoints", "--site", site_file, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout) == []
    proc = aimass("serve", "stop", "toy@prod", "--site", site_file)
    assert proc.returncode == 3 and "no running replica" in proc.stderr
    proc = aimass("serve", "upgrade", "toy@prod", "--site", site_file)
    assert proc.returncode == 3 and "no running service" in proc.stderr


def test_bench_needs_a_live_service(site_file: str) -> None:
    proc = aimass("bench", "toy@prod", "--site", site_file, "--duration", "1")
    assert proc.returncode == 3 and "toy@prod" in proc.stderr


def test_help_lists_the_serve_commands() -> None:
    proc = aimass("serve", "--help")
    assert proc.returncode == 0
    for word in ("start", "upgrade", "stop"):
        assert word in proc.stdout
    assert aimass("reserve", "--help").returncode == 0
    assert aimass("endpoints", "--help").returncode == 0


def test_successor_options_come_from_the_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    spec = {
        "request": {"gpus_per_node": 1, "cpus_per_task": 4, "time": "01:00:00",
                    "reservation": "r1", "partition": "debug"},
        "spec": {"serve": {"model": "toy@prod", "replicas": 3, "repo": "/m",
                           "max_batch_size": 16, "threads": 3, "device": "cpu"}},
    }  # fmt: skip
    (run / "spec.json").write_text(json.dumps(spec))
    opts = service_options(run)
    assert (opts.ref, opts.replicas, opts.gpus, opts.cpus) == ("toy@prod", 3, 1, 4)
    assert (opts.time, opts.reservation, opts.max_batch_size) == ("01:00:00", "r1", 16)
    assert opts.extra == {"device": "cpu"}


def test_scontrol_messages_become_one_line_errors() -> None:
    denied = explain_failure("create", "r", "Error creating the reservation: Invalid user id\n")
    assert isinstance(denied, ConflictError) and "admin rights" in str(denied)
    gone = explain_failure("delete", "r", "delete_reservation reservationname=r: Requested "
                           "reservation is invalid")  # fmt: skip
    assert isinstance(gone, NotFoundError)
    other = explain_failure("create", "r", "Error creating the reservation: Node busy")
    assert isinstance(other, SchedulerError) and "Node busy" in str(other)
    rows = parse_reservations(
        "ReservationName=a StartTime=now Nodes=node[1-2] Users=root Flags=IGNORE_JOBS\n"
        "No reservations in the system\n"
        "ReservationName=b Nodes=node3\n"
    )
    assert [r["ReservationName"] for r in rows] == ["a", "b"] and rows[0]["Nodes"] == "node[1-2]"
