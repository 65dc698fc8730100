"""Script mode on the local Slurm cluster: a researcher's own training script, run on every rank.

Issue 12: a job out of restarts ends FAILED with the reason in result.json; preemptions.jsonl
says what actually happened to a SIGTERM stop; a script-mode model carries a recipe and can be
served; a script that only calls ``runtime.init()`` ends COMPLETED on both backends; a resumed
script ends with weights bit-for-bit equal to an uninterrupted run.

The scripts are written here (a few-line model), not taken from examples/. All jobs are
submitted at once by a module fixture and waited for by the tests that need them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _sitefixtures import write_site

from aimass_hpc.config.site import Site
from aimass_hpc.launch.scheduler import get_scheduler
from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.metrics import read_metrics
from aimass_hpc.serve import Client

pytestmark = pytest.mark.cluster

MODEL_PY = """
from torch import nn


def build(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 1))
"""

# The documented pattern (aimass_hpc/runtime/api.py), plus two ways to be interrupted.
TRAIN_PY = """
import argparse, os, signal, subprocess, time
import torch
from torch import nn
import tinymodel
from aimass_hpc import runtime
from aimass_hpc.runtime import preempt

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30)
p.add_argument("--usr1-at", default="")      # "5,12": at restart N, SIGUSR1 after that step
p.add_argument("--requeue-at", type=int, default=-1)  # restart 0: rank 0 scontrol-requeues
a = p.parse_args()
usr1 = [int(s) for s in a.usr1_at.split(",") if s]

job = runtime.init()
restart = job.world.restart_count
torch.manual_seed(0)
model = tinymodel.build(hidden=8)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
job.log_params(lr=0.05, momentum=0.9, hidden=8)
net, opt = job.wrap(model, opt)
state = job.restore(model, opt)
start = state["step"] + 1 if state else 0
x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
batches = job.sampler(len(x), batch_size=32, seed=3)
for step in range(start, a.steps):
    epoch, b = batches.position(step)
    idx = batches.local_indices(batches.order(epoch), b)
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x[idx]), y[idx])
    loss.backward()
    opt.step()
    job.log_metrics(step, loss=loss.item())
    if job.rank == 0 and restart < len(usr1) and step == usr1[restart]:
        os.kill(os.getpid(), signal.SIGUSR1)
    if job.rank == 0 and restart == 0 and step == a.requeue_at:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True)
        deadline = time.monotonic() + 120
        while not preempt.requested() and time.monotonic() < deadline:
            time.sleep(0.1)
    if job.should_stop():
        job.save_checkpoint(step, model, opt)
        job.exit_for_requeue(step=step, total_steps=a.steps)
print(f"rank {job.rank} of {job.world_size} done at restart {restart}", flush=True)
job.finish(model, metrics={"loss": loss.item()}, model_type="regressor",
           recipe={"factory": "tinymodel:build", "kwargs": {"hidden": 8}, "input_shape": [4]})
"""

INIT_ONLY_PY = """
from aimass_hpc import runtime
runtime.init()
"""

# Written for torchrun: no aimass import, the rank from the environment (env://).
TORCHRUN_PY = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: sum {total.item():g}", flush=True)
dist.destroy_process_group()
"""

X = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)


def spec(name: str, script: str, *, args: list[str], nodes: int = 2, tasks: int = 2) -> str:
    return f"""
name = "{name}"
[script]
path = "{script}"
args = {json.dumps(args)}
[model]
name = "{name}"
[job]
nodes = {nodes}
tasks_per_node = {tasks}
cpus_per_task = 1
time = "00:10:00"
"""


def aimass(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "aimass_hpc", *args], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def submit(site: Site, tmp: Path, text: str, *more: str) -> tuple[str, Path]:
    path = tmp / f"spec-{time.monotonic_ns()}.toml"
    path.write_text(text, encoding="utf-8")
    out = aimass("train", str(path), "--site", site.source or "", "--json", *more)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return data["job_id"], Path(data["run_dir"])


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").iterdir()))


def result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


class Jobs:
    """Every job of this module, submitted at once."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        (tmp / "tinymodel.py").write_text(MODEL_PY)
        (tmp / "train.py").write_text(TRAIN_PY)
        (tmp / "init_only.py").write_text(INIT_ONLY_PY)
        (tmp / "torchrun_style.py").write_text(TORCHRUN_PY)
        preemption = {"signal": "USR1", "grace_seconds": 45, "max_restarts": 1}
        self.site = write_site(tmp, "dev", preemption=preemption)
        self.ids: dict[str, tuple[str, Path]] = {
            "ref": submit(self.site, tmp, spec("sm-ref", "train.py", args=[])),
            "term": submit(
                self.site, tmp, spec("sm-term", "train.py", args=["--requeue-at", "10"])
            ),
            "limit": submit(
                self.site, tmp, spec("sm-limit", "train.py", args=["--usr1-at", "5,12"], nodes=1)
            ),
            "init-torch": submit(self.site, tmp, spec("sm-init", "init_only.py", args=[])),
            "torchrun": submit(self.site, tmp, spec("sm-torchrun", "torchrun_style.py", args=[])),
            "init-horovod": submit(
                self.site, tmp, spec("sm-init", "init_only.py", args=[]), "--backend", "horovod"
            ),
        }
        self._final: dict[str, Any] = {}

    def wait(self, key: str, timeout: float = 600) -> tuple[str, Path]:
        """(final Slurm state, run dir) of job ``key``."""
        job_id, run_dir = self.ids[key]
        if key not in self._final:
            got = get_scheduler(self.site).wait([job_id], timeout=timeout, poll=2.0)
            self._final[key] = got[job_id]
        return self._final[key].state.value, run_dir

    def info(self, key: str) -> Any:
        self.wait(key)
        return self._final[key]

    def weights(self, run_dir: Path) -> dict[str, torch.Tensor]:
        ref = result(run_dir)["final_ref"]
        return dict(ModelRepository(self.site.models_root).load(ref).state_dict)


@pytest.fixture(scope="module")
def jobs(cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Jobs:
    return Jobs(tmp_path_factory.mktemp("script-mode"))


@pytest.mark.parametrize("backend", ["torch", "horovod"])
def test_a_script_that_only_calls_init_ends_completed(jobs: Jobs, backend: str) -> None:
    state, run_dir = jobs.wait(f"init-{backend}")
    assert state == "COMPLETED", logs(run_dir)
    assert "failed" not in logs(run_dir).lower()


def test_a_script_written_for_torchrun_runs_as_it_is(jobs: Jobs) -> None:
    state, run_dir = jobs.wait("torchrun")
    assert state == "COMPLETED", logs(run_dir)
    # 2 nodes x 2 ranks: every rank saw the world torchrun would have given it.
    for rank in range(4):
        assert f"rank {rank} of 4: sum 10" in logs(run_dir), logs(run_dir)


def test_a_job_out_of_restarts_ends_failed_with_the_reason(jobs: Jobs) -> None:
    state, run_dir = jobs.wait("limit")
    assert state == "FAILED", logs(run_dir)
    assert jobs.info("limit").restart_count == 1  # the first warning did requeue it
    res = result(run_dir)
    assert res["status"] == "failed" and res["restart"] == 1
    assert res["reason"] == "restart limit reached, 1 of 1, last step 12 of 30"
    stops = [json.loads(x) for x in (run_dir / "preemptions.jsonl").read_text().splitlines()]
    assert [(s["restart"], s["requeued"]) for s in stops] == [(0, True), (1, False)]
    exits = [json.loads(p.read_text()) for p in sorted((run_dir / "logs").glob("exit-*.json"))]
    assert exits and exits[-1]["exit_code"] != 0


def test_scontrol_requeue_is_recorded_and_resume_is_bit_identical(jobs: Jobs) -> None:
    ref_state, ref_dir = jobs.wait("ref")
    state, run_dir = jobs.wait("term")
    assert ref_state == "COMPLETED", logs(ref_dir)
    assert state == "COMPLETED", logs(run_dir)
    assert jobs.info("term").restart_count == 1
    records = [json.loads(x) for x in (run_dir / "preemptions.jsonl").read_text().splitlines()]
    stop, confirm = records
    assert stop["kind"] == "stop" and stop["signals"] == ["SIGTERM"]
    assert stop["requeued"] is None  # pending: Slurm decided ...
    assert confirm == {
        **confirm,
        "kind": "restart",
        "restart": 1,
        "requeued": True,
        "confirms_restart": 0,
    }  # fmt: skip  ... and the job came back
    resumes = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [10]
    a, b = jobs.weights(ref_dir), jobs.weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_script_mode_model_is_listed_and_served(jobs: Jobs) -> None:
    state, run_dir = jobs.wait("ref")
    assert state == "COMPLETED", logs(run_dir)
    site = jobs.site.source or ""
    final_ref = result(run_dir)["final_ref"]
    version = ModelRepository(jobs.site.models_root).get(final_ref)
    assert version.recipe["factory"] == "tinymodel:build"
    assert str(jobs.tmp) in version.recipe["pythonpath"]
    assert version.hyperparameters == {"lr": 0.05, "momentum": 0.9, "hidden": 8}
    listed = json.loads(aimass("models", "ls", "--site", site, "--json").stdout)
    assert "sm-ref" in json.dumps(listed)
    promote = aimass("models", "promote", final_ref, "prod", "--site", site)
    assert promote.returncode == 0, promote.stderr
    out = aimass("serve", "sm-ref@prod", "--site", site, "--wait", "--timeout", "240", "--json")
    try:
        assert out.returncode == 0, out.stderr
        with Client("sm-ref@prod", runs_root=jobs.site.runs_root) as client:
            got = client.predict(X)
        sys.path.insert(0, str(jobs.tmp))
        import tinymodel  # type: ignore[import-not-found]

        net = tinymodel.build(hidden=8).eval()
        net.load_state_dict(jobs.weights(run_dir))
        with torch.inference_mode():
            want = net(torch.from_numpy(X)).numpy()
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    finally:
        aimass("serve", "stop", "sm-ref@prod", "--site", site)
