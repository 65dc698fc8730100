"""FSDP on the local Slurm cluster: 2 nodes x 2 ranks, sharded checkpoints, requeue, reshard.

Every job goes through ``aimass train --backend fsdp`` as a user's would (real sbatch/srun,
Gloo on the nodes' CPUs). The digits MLP with dropout off; ``step_delay`` stretches a run so
it can be interrupted without changing a number it computes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.config.site import Site
from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.repo import ModelRepository

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def spec_text(name: str, *, nodes: int, tasks: int, step_delay: float = 0.0, **train: Any) -> str:
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in train.items())
    return f"""
name = "{name}"
pythonpath = {json.dumps([str(DIGITS)])}
[task]
ref = "digits_mlp:build"
args = {{ dropout = 0.0, step_delay = {step_delay} }}
[train]
optimizer = "adam"
lr = 0.01
batch_size = 64
seed = 7
{extra}
[model]
name = "{name}"
[job]
nodes = {nodes}
tasks_per_node = {tasks}
cpus_per_task = 1
time = "00:10:00"
"""


@pytest.fixture(scope="module")
def site(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Site:
    tmp = tmp_path_factory.mktemp("fsdp-site")
    return write_site(
        tmp, "dev", preemption={"signal": "USR1", "grace_seconds": 45, "max_restarts": 3}
    )


def submit(site: Site, tmp: Path, text: str, *args: str) -> tuple[str, Path]:
    path = tmp / f"spec-{time.monotonic_ns()}.toml"
    path.write_text(text, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "aimass_hpc", "train", str(path), "--site", site.source or "",
         "--json", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return data["job_id"], Path(data["run_dir"])


def finish(site: Site, job_id: str, run_dir: Path) -> Any:
    final = get_scheduler(site).wait([job_id], timeout=600, poll=2.0)[job_id]
    logs = "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").iterdir()))
    assert final.state.value == "COMPLETED", logs
    return final


def result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


def weights(site: Site, run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(ModelRepository(site.models_root).load(result(run_dir)["final_ref"]).state_dict)


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def wait_for_checkpoint(run_dir: Path) -> None:
    index = run_dir / "checkpoints.jsonl"
    deadline = time.monotonic() + 300
    while not (index.exists() and index.read_text().strip()):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)


def test_fsdp_on_two_nodes_matches_one_process_requeue_and_reshard(
    site: Site, tmp_path: Path
) -> None:
    common = {"steps": 40, "checkpoint_every": 10}

    def job(name: str, nodes: int, tasks: int, backend: str, *args: str, delay: float = 0.0):
        text = spec_text(name, nodes=nodes, tasks=tasks, step_delay=delay, **common)
        return submit(site, tmp_path, text, "--backend", backend, *args)

    one = job("fsdp-one", 1, 1, "torch")
    four = job("fsdp-four", 2, 2, "fsdp")
    requeued = job("fsdp-requeued", 2, 2, "fsdp", delay=0.3)
    cancelled = job("fsdp-cancelled", 2, 2, "fsdp", delay=0.3)
    # Requeued mid-run by Slurm (SIGTERM to every rank): it resumes on its own 4 ranks.
    wait_for_checkpoint(requeued[1])
    subprocess.run(["scontrol", "requeue", requeued[0]], check=True, capture_output=True)
    # Cancelled mid-run, then continued by a new job on 2 ranks of one node (--resume-from).
    wait_for_checkpoint(cancelled[1])
    subprocess.run(["scancel", cancelled[0]], check=True, capture_output=True)
    get_scheduler(site).wait([cancelled[0]], timeout=120, poll=1.0)
    saved = [json.loads(x) for x in (cancelled[1] / "checkpoints.jsonl").read_text().splitlines()]
    assert saved and saved[-1]["step"] < 40
    on2 = job("fsdp-cancelled", 1, 2, "fsdp", "--resume-from", str(cancelled[1]))
    finish(site, *one)
    finish(site, *four)
    assert finish(site, *requeued).restart_count >= 1
    finish(site, *on2)
    ref_w = weights(site, one[1])
    four_w = weights(site, four[1])
    # 2 nodes x 2 ranks of FSDP == one process, within float summation order.
    assert close(four_w, ref_w)
    assert result(four[1])["world"]["backend"] == "fsdp"
    version = ModelRepository(site.models_root).get(result(four[1])["final_ref"])
    assert version.kind == "sharded" and len(version.metadata["shards"]) == 4
    # Requeued on the same world size: bit for bit the uninterrupted FSDP run.
    requeued_w = weights(site, requeued[1])
    assert all(torch.equal(requeued_w[k], four_w[k]) for k in four_w)
    # Saved on 4 ranks, finished on 2: the same weights within summation order.
    resumed = [json.loads(x) for x in (on2[1] / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" for r in resumed)
    assert close(weights(site, on2[1]), four_w)
