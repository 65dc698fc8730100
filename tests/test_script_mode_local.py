"""Script mode without Slurm: a user's own script run by ``python -m aimass_hpc.runtime run`` on
several local ranks that meet through torch.distributed's Gloo backend, as ranks of a job do.

Issue 12: collective start-up/shutdown, exact resume, the end of a job that may not requeue,
preemptions.jsonl confirming a requeue, and a final version that carries a recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.config import RunConfig
from aimass_hpc.runtime.metrics import read_metrics

MODEL_PY = """
from torch import nn


def build(hidden: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(hidden, 1))
"""

# The documented pattern (aimass_hpc/runtime/api.py); STOP_AT/STOP_SIGNAL interrupt it.
TRAIN_PY = """
import os, signal
import torch
from torch import nn
import tinymodel
from aimass_hpc import runtime

steps = int(os.environ.get("STEPS", "24"))
stop_at = int(os.environ.get("STOP_AT", "-1"))
job = runtime.init()
torch.manual_seed(0)
model = tinymodel.build(hidden=8)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
job.log_params(lr=0.05, hidden=8)
net, opt = job.wrap(model, opt)
state = job.restore(model, opt)
start = state["step"] + 1 if state else 0
x = torch.randn(256, 4, generator=torch.Generator().manual_seed(1))
y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
batches = job.sampler(len(x), batch_size=32, seed=3)
for step in range(start, steps):
    epoch, b = batches.position(step)
    idx = batches.local_indices(batches.order(epoch), b)
    opt.zero_grad()
    loss = nn.functional.mse_loss(net(x[idx]), y[idx])
    loss.backward()
    opt.step()
    job.log_metrics(step, loss=loss.item())
    if step == stop_at and job.rank == 0:
        os.kill(os.getpid(), getattr(signal, os.environ.get("STOP_SIGNAL", "SIGTERM")))
    if job.should_stop():
        job.save_checkpoint(step, model, opt)
        job.exit_for_requeue(step=step, total_steps=steps)
job.finish(model, metrics={"loss": loss.item()}, hyperparameters={"steps": steps},
           recipe={"factory": "tinymodel:build", "kwargs": {"hidden": 8}, "input_shape": [4]})
"""

INIT_ONLY_PY = """
from aimass_hpc import runtime
runtime.init()
"""


def _setup(tmp: Path, name: str, *, max_restarts: int = 3) -> Path:
    """A run dir with train.json for ``script`` (repository under tmp); returns the run dir."""
    (tmp / "tinymodel.py").write_text(MODEL_PY)
    (tmp / "train.py").write_text(TRAIN_PY)
    (tmp / "init_only.py").write_text(INIT_ONLY_PY)
    run_dir = tmp / name
    run_dir.mkdir()
    cfg = RunConfig(
        run_dir=str(run_dir),
        script=str(tmp / "train.py"),
        model_name="tiny",
        repository=str(tmp / "repo"),
        max_restarts=max_restarts,
    )
    (run_dir / "train.json").write_text(json.dumps(cfg.to_dict()))
    return run_dir


def _run(run_dir: Path, script: str, world: int, port: int, **env: str) -> list[tuple[int, str]]:
    """Run ``script`` on ``world`` local ranks; (exit status, stderr) of each."""
    procs = []
    for rank in range(world):
        full = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "AIMASS_RUN_DIR": str(run_dir),
            **env,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "aimass_hpc.runtime", "run", script],
                env=full,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        out.append((p.returncode, err))
    return out


def _port() -> int:
    return 29800 + os.getpid() % 600


def _result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


def _weights(tmp: Path, run_dir: Path) -> dict[str, torch.Tensor]:
    return dict(ModelRepository(tmp / "repo").load(_result(run_dir)["final_ref"]).state_dict)


def test_a_script_that_only_calls_init_exits_cleanly_on_every_rank(tmp_path: Path) -> None:
    run_dir = _setup(tmp_path, "init")
    got = _run(run_dir, str(tmp_path / "init_only.py"), 4, _port())
    assert [code for code, _ in got] == [0] * 4, [err[-2000:] for _, err in got]


def test_an_interrupted_script_resumes_to_bit_identical_weights(tmp_path: Path) -> None:
    """Four ranks: with two, a+b is the same in any order; with four the summation order
    depends on where DDP put each gradient in its buckets, which must not change on resume."""
    script = str(tmp_path / "train.py")
    ref = _setup(tmp_path, "ref")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "train.json").write_text(
        (ref / "train.json").read_text().replace(str(ref), str(victim))
    )
    assert [c for c, _ in _run(ref, script, 4, _port())] == [0] * 4
    stopped = _run(victim, script, 4, _port() + 1, STOP_AT="9")
    assert [c for c, _ in stopped] == [0] * 4, stopped[0][1][-2000:]
    res = _result(victim)
    assert res["status"] == "stopped" and res["step"] == 9
    assert res["reason"] == ("stopped by SIGTERM; Slurm decides what follows, last step 9 of 24")
    (stop,) = [json.loads(x) for x in (victim / "preemptions.jsonl").read_text().splitlines()]
    assert stop["signals"] == ["SIGTERM"] and stop["requeued"] is None  # Slurm decides
    (event,) = [r for r in read_metrics(victim) if r.get("event") == "preempt"]
    assert event["kind"] == "event" and event["signals"] == ["SIGTERM"]
    assert [c for c, _ in _run(victim, script, 4, _port() + 2)] == [0] * 4
    a, b = _weights(tmp_path, ref), _weights(tmp_path, victim)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_warning_without_restarts_left_fails_the_job_and_says_why(tmp_path: Path) -> None:
    run_dir = _setup(tmp_path, "limit", max_restarts=3)
    # The previous attempt stopped on SIGTERM (pending); this is the job's 4th start.
    pending = {"kind": "stop", "job_id": "4242", "restart": 2, "signals": ["SIGTERM"],
               "requeued": None, "reason": "stopped by SIGTERM"}  # fmt: skip
    (run_dir / "preemptions.jsonl").write_text(json.dumps(pending) + "\n")
    env = {"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "3", "STOP_AT": "4",
           "STOP_SIGNAL": "SIGUSR1", "STEPS": "20"}  # fmt: skip
    got = _run(run_dir, str(tmp_path / "train.py"), 2, _port() + 3, **env)
    assert [code for code, _ in got] == [3, 3], got[0][1][-2000:]
    res = _result(run_dir)
    assert res["status"] == "failed" and res["restart"] == 3
    assert res["reason"] == "restart limit reached, 3 of 3, last step 4 of 20"
    assert res["checkpoint_ref"] and res["step"] == 4
    records = [json.loads(x) for x in (run_dir / "preemptions.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["restart"], r["requeued"]) for r in records] == [
        ("stop", 2, None),
        ("restart", 3, True),  # the pending stop was a requeue: the job came back
        ("stop", 3, False),
    ]
    assert records[1]["confirms_restart"] == 2


def test_finish_records_recipe_hyperparameters_and_script_path(tmp_path: Path) -> None:
    run_dir = _setup(tmp_path, "final")
    got = _run(run_dir, str(tmp_path / "train.py"), 1, _port() + 4, STEPS="5")
    assert got[0][0] == 0, got[0][1][-2000:]
    version = ModelRepository(tmp_path / "repo").get(_result(run_dir)["final_ref"])
    assert version.recipe == {
        "factory": "tinymodel:build",
        "kwargs": {"hidden": 8},
        "input_shape": [4],
        "pythonpath": [str(tmp_path)],
    }
    assert version.hyperparameters == {"lr": 0.05, "hidden": 8, "steps": 5}
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    params = [e for e in events if e.get("event") == "params"]
    assert params and params[0]["params"] == {"lr": 0.05, "hidden": 8}
    # The recipe rebuilds the model the way a server does.
    from aimass_hpc.serve.model_loader import import_factory

    net = import_factory(version.recipe["factory"], version.recipe["pythonpath"])(hidden=8)
    net.load_state_dict(dict(ModelRepository(tmp_path / "repo").load(version.ref).state_dict))
    assert net.eval()(torch.zeros(2, 4)).shape == (2, 1)
