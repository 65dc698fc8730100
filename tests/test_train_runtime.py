"""The in-job runtime without Slurm: world discovery, sampler, signals, metrics, trainer.

Multi-rank tests start real processes (``python -m aimass_hpc.runtime``) that meet through
torch.distributed's Gloo backend on localhost, exactly as ranks of a job do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aimass_hpc.runtime import preempt, rng
from aimass_hpc.runtime.checkpoint import MemoryStore
from aimass_hpc.runtime.config import RunConfig, TrainParams
from aimass_hpc.runtime.env import (
    WorldInfo,
    expand_tasks_per_node,
    gpu_index,
    port_for_job,
    torchrun_env,
)
from aimass_hpc.runtime.metrics import MetricsWriter, read_metrics
from aimass_hpc.runtime.sampler import ShardedBatches, shard_range
from aimass_hpc.runtime.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"
sys.path.insert(0, str(DIGITS))

import digits_mlp  # noqa: E402

# ------------------------------------------------------------------------- world / env


def test_world_from_srun_step_environment() -> None:
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_RESTART_COUNT": "2",
        "MASTER_ADDR": "10.0.0.7",
    }
    world = WorldInfo.from_env(env)
    assert (world.rank, world.world_size, world.local_rank) == (3, 4, 1)
    assert (world.node_rank, world.num_nodes, world.local_world_size) == (1, 2, 2)
    assert world.master_addr == "10.0.0.7" and world.master_port == port_for_job("4242")
    assert world.restart_count == 2 and world.launcher == "srun"
    # Script mode hands a torchrun-style script the same world in torchrun's variables.
    again = WorldInfo.from_env({**env, **torchrun_env(world)})
    fields = ("rank", "world_size", "local_rank", "local_world_size", "node_rank", "num_nodes")
    assert [getattr(again, f) for f in fields] == [getattr(world, f) for f in fields]
    assert (again.master_addr, again.master_port, again.job_id) == (
        world.master_addr,
        world.master_port,
        "4242",
    )


def test_batch_shell_is_not_mistaken_for_a_rank() -> None:
    # The batch script sees SLURM_PROCID=0 and the job's SLURM_NTASKS but is no srun task.
    world = WorldInfo.from_env({"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"})
    assert world.world_size == 1 and world.launcher == "none"


def test_world_from_torchrun_and_openmpi_variables() -> None:
    tr = WorldInfo.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (tr.rank, tr.world_size, tr.local_rank) == (1, 2, 1)
    ompi = WorldInfo.from_env(
        {
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "6",
            "OMPI_COMM_WORLD_LOCAL_RANK": "2",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "3",
        }
    )
    assert (ompi.rank, ompi.world_size, ompi.local_rank, ompi.num_nodes) == (5, 6, 2, 2)


def test_tasks_per_node_notation_and_gpu_binding() -> None:
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    # Every task sees the node's 4 GPUs: bind by local id. With --gpu-bind each sees one.
    assert [gpu_index(i, 4) for i in range(4)] == [0, 1, 2, 3]
    assert gpu_index(3, 1) == 0


def test_ports_differ_between_jobs() -> None:
    assert port_for_job("100") != port_for_job("101")
    assert 20000 <= port_for_job("123456_7") < 40000


# ------------------------------------------------------------------------- sampler


def test_ranks_split_each_global_batch_exactly() -> None:
    single = ShardedBatches(100, 8, world_size=1, rank=0, seed=3)
    ranks = [ShardedBatches(100, 8, world_size=4, rank=r, seed=3) for r in range(4)]
    order = single.order(epoch=2)
    assert torch.equal(order, ranks[1].order(epoch=2))
    for b in range(single.batches_per_epoch):
        together = torch.cat([s.local_indices(order, b) for s in ranks])
        assert torch.equal(together, single.local_indices(order, b))
    assert single.position(25) == (2, 1)  # 12 batches per epoch


def test_sampler_rejects_batches_that_do_not_split() -> None:
    with pytest.raises(ValueError, match="multiple of the world size"):
        ShardedBatches(100, 6, world_size=4)


def test_eval_shards_cover_everything_once() -> None:
    parts = [list(shard_range(10, 3, r)) for r in range(3)]
    assert sum(parts, []) == list(range(10))


# ------------------------------------------------------------------------- signals


def test_signal_sets_a_flag_and_warning_outranks_term() -> None:
    preempt.reset()
    preempt.install(("USR1", "TERM"))
    try:
        assert preempt.local_stop_code("USR1") == preempt.STOP_NONE
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.requested() and preempt.local_stop_code("USR1") == preempt.STOP_TERM
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.local_stop_code("USR1") == preempt.STOP_WARN
        assert preempt.received() == ["SIGTERM", "SIGUSR1"]
    finally:
        preempt.uninstall()
        preempt.reset()


def test_requeue_target_is_array_aware_and_respects_the_limit() -> None:
    t = preempt.RequeueTarget.from_env(
        {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "88", "SLURM_ARRAY_TASK_ID": "2"}
    )
    assert t.job_id == "88_2"
    plain = preempt.RequeueTarget.from_env({"SLURM_JOB_ID": "90", "SLURM_RESTART_COUNT": "3"})
    assert plain.job_id == "90" and plain.restart_count == 3
    outcome = preempt.requeue(plain, max_restarts=3)
    assert not outcome.requeued and "restart limit" in outcome.reason
    assert not preempt.requeue(preempt.RequeueTarget(None, 0), 3).requeued


def test_signal_names() -> None:
    assert preempt.parse_signal("B:USR1") == signal.SIGUSR1
    assert preempt.parse_signal("SIGTERM") == signal.SIGTERM
    assert preempt.parse_job_state("JobId=5 JobName=x JobState=PREEMPTED Reason=None") == (
        "PREEMPTED"
    )


# ------------------------------------------------------------------------- metrics


def test_metrics_after_a_resume_drop_the_retrained_steps(tmp_path: Path) -> None:
    w = MetricsWriter(tmp_path, flush_every=2)
    for step in range(1, 6):
        w.log("step", step=step, loss=1.0 / step)
    w.log("event", event="resume", step=3)
    for step in range(4, 7):
        w.log("step", step=step, loss=0.5 / step)
    w.flush()
    steps = [r["step"] for r in read_metrics(tmp_path) if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(tmp_path) if r["step"] == 5][0] == 0.1


def test_rng_capture_restore_round_trip() -> None:
    import random

    import numpy as np

    rng.seed_everything(5)
    state = rng.capture()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    rng.restore(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ------------------------------------------------------------------------- trainer in-process

PARAMS = TrainParams(
    optimizer="sgd",
    lr=0.1,
    momentum=0.9,
    batch_size=64,
    epochs=2,
    seed=0,
    checkpoint_every=7,
    lr_schedule="cosine",
    warmup_steps=5,
)


def _fit_until_done(store: MemoryStore, stop_after_calls: list[int]) -> tuple[Trainer, list]:
    """Run fits against one store until completion, stopping at the given loss calls."""
    stops = list(stop_after_calls)
    outcomes = []
    while True:
        preempt.reset()
        rng.seed_everything(PARAMS.seed)
        task = digits_mlp.build()
        calls = {"n": 0}
        inner = task.loss

        def loss(out, y, inner=inner, calls=calls):
            calls["n"] += 1
            if stops and torch.is_grad_enabled() and calls["n"] == stops[0]:
                stops.pop(0)
                preempt.simulate("USR1")
            return inner(out, y)

        task.loss = loss
        trainer = Trainer(task, PARAMS, store=store)
        result = trainer.fit()
        outcomes.append((result.status, result.step))
        if result.status == "completed":
            preempt.reset()
            return trainer, outcomes


def test_resumed_any_number_of_times_equals_uninterrupted_bit_for_bit() -> None:
    straight, plain = _fit_until_done(MemoryStore(), [])
    store = MemoryStore()
    resumed, outcomes = _fit_until_done(store, [3, 9, 2, 15])
    assert plain == [("completed", 44)]
    assert [s for s, _ in outcomes] == ["stopped"] * 4 + ["completed"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.last_metrics == resumed.last_metrics
    # Lineage: every checkpoint's parent is the one before it, the last one is final.
    history = store.history()
    assert history[-1]["kind"] == "final"
    assert all(h["parent"] == prev["ref"] for prev, h in zip(history, history[1:], strict=False))


def test_restarting_a_finished_run_changes_nothing() -> None:
    store = MemoryStore()
    first, _ = _fit_until_done(store, [])
    again, outcomes = _fit_until_done(store, [])
    assert outcomes == [("completed", 44)]
    assert len([h for h in store.history() if h["kind"] == "final"]) == 1


# ------------------------------------------------------------------------- real processes


def _config(tmp: Path, name: str, **train: object) -> Path:
    run_dir = tmp / name
    run_dir.mkdir()
    params = {"batch_size": 64, "epochs": 2, "seed": 1, "lr": 0.1, "momentum": 0.9}
    params.update(train)
    cfg = RunConfig(
        run_dir=str(run_dir),
        backend="torch",
        task="digits_mlp:build",
        task_args={"dropout": 0.0},
        train=TrainParams(**params),  # type: ignore[arg-type]
        pythonpath=[str(DIGITS)],
    )
    path = run_dir / "train.json"
    path.write_text(__import__("json").dumps(cfg.to_dict()))
    return path


def _launch(config: Path, world: int, port: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        if world == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(key)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "aimass_hpc.runtime", "train", "--config", str(config)],
                env=env,
                stderr=subprocess.PIPE,
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen[bytes]], timeout: float = 300) -> list[int]:
    codes = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        codes.append(p.returncode)
        if p.returncode != 0:
            print(err.decode(errors="replace"), file=sys.stderr)
    return codes


def _result(config: Path) -> dict:
    import json

    return json.loads((config.parent / "result.json").read_text())


def test_two_gloo_ranks_match_one_process(tmp_path: Path) -> None:
    one = _config(tmp_path, "one")
    two = _config(tmp_path, "two")
    assert _finish(_launch(one, 1, 0)) == [0]
    launched = time.time()
    assert _finish(_launch(two, 2, 29000 + os.getpid() % 1000)) == [0, 0]
    m1, m2 = _result(one)["metrics"], _result(two)["metrics"]
    # Same samples per step, gradients averaged: only float summation order differs.
    for key in ("val_loss", "accuracy", "train_loss"):
        assert m1[key] == pytest.approx(m2[key], abs=1e-4), key
    steps = [r for r in read_metrics(two.parent) if r["kind"] == "step"]
    assert len(steps) == 44 and all(r["samples_per_s"] > 0 for r in steps)
    # The start record says how long the rank took to get to training (torch import etc.).
    start = next(r for r in read_metrics(two.parent) if r.get("event") == "start")
    assert 0 < start["startup_s"] < start["time"] - launched + 0.5, start


def test_a_crashing_rank_exits_nonzero_fast(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "crash")
    data = __import__("json").loads(cfg.read_text())
    data["task_args"] = {"bogus_argument": 1}  # the task function raises TypeError
    cfg.write_text(__import__("json").dumps(data))
    procs = _launch(cfg, 1, 0)
    assert _finish(procs, timeout=120) == [1]


def _weights(repo_dir: Path, ref: str) -> dict[str, torch.Tensor]:
    from aimass_hpc.repo import ModelRepository

    return dict(ModelRepository(repo_dir).load(ref).state_dict)


def test_four_ranks_stopped_by_sigterm_resume_bit_for_bit(tmp_path: Path) -> None:
    """Real SIGTERM to every rank mid-run, restart, and compare with an uninterrupted run.

    Four ranks, not two: with two the gradient sum a+b is the same in any order, with four
    the order matters, which is what DDP's bucket layout must not change after a resume.
    """
    repo = tmp_path / "repo"
    common = {"checkpoint_every": 10, "lr_schedule": "cosine"}
    ref = _config(tmp_path, "ref", **common)
    victim = _config(tmp_path, "victim", **common)
    for cfg, delay in ((ref, 0.0), (victim, 0.1)):
        data = __import__("json").loads(cfg.read_text())
        data.update(repository=str(repo), model_name="digits")
        data["task_args"] = {"dropout": 0.1, "step_delay": delay}
        cfg.write_text(__import__("json").dumps(data))
    port = 29100 + os.getpid() % 700
    assert _finish(_launch(ref, 4, port)) == [0] * 4
    procs = _launch(victim, 4, port + 1)
    index = victim.parent / "checkpoints.jsonl"
    deadline = time.monotonic() + 240
    while not (index.exists() and index.read_text().strip()):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert _finish(procs) == [0] * 4
    stopped = _result(victim)
    assert stopped["status"] == "stopped" and 10 <= stopped["step"] < 44
    assert _finish(_launch(victim, 4, port + 2)) == [0] * 4
    a = _weights(repo, _result(ref)["final_ref"])
    b = _weights(repo, _result(victim)["final_ref"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_warning_during_torch_import_is_not_lost(tmp_path: Path) -> None:
    """The handler is installed before torch loads: SIGUSR1 mid-import stops the run cleanly
    at its first step boundary (SIGUSR1's default action would kill the process)."""
    cfg = _config(tmp_path, "early")
    (proc,) = _launch(cfg, 1, 0)
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + 120
    while "libtorch" not in maps.read_text():  # torch is being imported right now
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    # Outside Slurm there is nothing to requeue: the job reports the unacted warning (3).
    assert _finish([proc]) == [3]
    res = _result(cfg)
    assert res["status"] == "stopped" and res["step"] < res["total_steps"]
    stops = (cfg.parent / "preemptions.jsonl").read_text()
    assert '"SIGUSR1"' in stops and '"requeued": false' in stops
