"""Issue 14 (serving throughput): the served model runs in a process of its own.

Specification: ``ModelProcess`` loads the model in a spawned child and answers forwards over
pipes with the same numbers as the model in one process, from several threads at once; a
model error comes back with the model's own ``Type: message`` and the child keeps serving;
a loader error is the replica's failure message; a child that dies makes every forward fail
with ``ModelProcessError`` (HTTP 503: retry elsewhere) and the replica FAILED, so that it is
replaced; the termination signals Slurm sends to every process of a step do not end the
child (the replica drains first), and ``close`` does.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aimass_hpc.serve import toymodels
from aimass_hpc.serve.endpoints import EndpointState
from aimass_hpc.serve.local import LocalReplica
from aimass_hpc.serve.model_loader import load_from_files
from aimass_hpc.serve.model_process import (
    ModelProcess,
    ModelProcessError,
    RemoteForwardError,
    reason_of,
)

KW = {"in_features": 8, "hidden": 16, "out_features": 3, "depth": 2}


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mp") / "w.pt"
    torch.save(toymodels.mlp(**KW).state_dict(), path)
    return path


def _loader(weights: Path | str) -> functools.partial:
    return functools.partial(
        load_from_files, toymodels.recipe(**KW), weights, name="toy", version="3", device="cpu"
    )


@pytest.fixture(scope="module")
def process(weights: Path):
    proc = ModelProcess(_loader(weights), channels=2, threads=1)
    model = proc.wait_loaded()
    yield proc, model
    proc.close()


def test_forward_in_the_child_equals_the_model_in_one_process(process, weights: Path) -> None:
    proc, remote = process
    local = _loader(weights)()
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    np.testing.assert_array_equal(remote.forward(x), local.forward(x))
    assert remote.describe() == local.describe() | {"output_shape": [3]}
    assert (remote.name, remote.version, remote.spec) == ("toy", "3", local.spec)
    assert remote.warm_up() is not None and remote.output_shape == (3,)


def test_threads_share_the_child_and_each_gets_its_own_answer(process, weights: Path) -> None:
    proc, remote = process
    local = _loader(weights)()
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((n % 7 + 1, 8)).astype(np.float32) for n in range(40)]
    got: dict[int, np.ndarray] = {}

    def work(start: int) -> None:
        for i in range(start, len(inputs), 4):
            got[i] = remote.forward(inputs[i])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == list(range(len(inputs)))
    for i, x in enumerate(inputs):
        np.testing.assert_array_equal(got[i], local.forward(x))


def test_a_model_error_keeps_its_type_and_the_child_serves_on(process) -> None:
    proc, remote = process
    with pytest.raises(RemoteForwardError) as info:
        remote.forward(np.zeros((2, 5), np.float32))  # 5 features for a model of 8
    assert reason_of(info.value).startswith("RuntimeError: mat1 and mat2 shapes")
    assert remote.forward(np.zeros((1, 8), np.float32)).shape == (1, 3)


def test_termination_signals_do_not_end_the_child(process) -> None:
    proc, remote = process
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        os.kill(proc.proc.pid, sig)
    time.sleep(0.3)
    assert proc.alive()
    assert remote.forward(np.zeros((1, 8), np.float32)).shape == (1, 3)


def test_a_loader_error_is_the_replicas_message(tmp_path: Path) -> None:
    proc = ModelProcess(_loader(tmp_path / "missing.pt"), channels=1)
    with pytest.raises(ModelProcessError) as info:
        proc.wait_loaded()
    missing = tmp_path / "missing.pt"
    assert str(info.value) == f"NotFoundError: weights file {missing} does not exist"
    proc.close()
    assert not proc.alive()


def test_a_dead_child_fails_every_forward_and_close_is_quiet(weights: Path) -> None:
    proc = ModelProcess(_loader(weights), channels=1)
    remote = proc.wait_loaded()
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.join(10)
    assert not proc.alive()
    with pytest.raises(ModelProcessError, match="model process is gone"):
        remote.forward(np.zeros((1, 8), np.float32))
    assert proc.cuda_memory() == {}
    proc.close()


def test_close_ends_the_child(weights: Path) -> None:
    proc = ModelProcess(_loader(weights), channels=2)
    proc.wait_loaded()
    proc.close()
    assert not proc.alive() and proc.proc.exitcode == 0


def test_the_model_gets_its_own_process_with_two_cpus_or_when_asked() -> None:
    from aimass_hpc.serve.server import use_model_process

    assert use_model_process(True) is True and use_model_process(False) is False
    assert use_model_process(None) is (len(os.sched_getaffinity(0)) >= 2)


def _model_processes(pid: int) -> list[int]:
    """The spawned children of ``pid`` (multiprocessing's resource tracker is another one)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(k) for k in kids if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]


def test_a_replica_whose_model_process_dies_fails_and_exits(tmp_path: Path, weights: Path) -> None:
    rep = LocalReplica(
        tmp_path / "run",
        recipe=toymodels.recipe(**KW),
        weights=weights,
        name="toy",
        extra_args=["--drain-grace-s", "0", "--model-process"],
    )
    with rep:
        rep.wait_ready()
        (child,) = _model_processes(rep.proc.pid)
        os.kill(child, signal.SIGKILL)
        assert rep.proc.wait(30) == 1
        record = rep.record()
        assert record is not None and record.state == EndpointState.FAILED
        assert record.message is not None and "model process exited with code -9" in record.message


def test_metrics_show_the_model_process_gpu_memory() -> None:
    from aimass_hpc.serve.metrics import ServeMetrics

    metrics = ServeMetrics(frozenset())
    metrics.cuda_memory = lambda: {"cuda:0": {"allocated": 5.0, "reserved": 8.0}}
    text = metrics.render().decode()
    assert 'aimass_serve_gpu_memory_bytes{device="cuda:0",kind="allocated"} 5.0' in text
    assert 'aimass_serve_gpu_memory_bytes{device="cuda:0",kind="reserved"} 8.0' in text


@pytest.mark.parametrize(("delay_ms", "own_process"), [(0.0, False), (5.0, True)])
def test_unless_asked_a_cheap_forward_stays_on_a_thread(
    tmp_path: Path, delay_ms: float, own_process: bool
) -> None:
    # The replica's default: a model process when 2+ CPUs and a full batch takes >= 1 ms.
    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("this test needs 2 CPUs (the replica decides by the CPUs it may use)")
    kw = {"in_features": 8, "hidden": 16, "out_features": 3, "delay_ms": delay_ms}
    rep = LocalReplica(
        tmp_path / "run",
        recipe=toymodels.recipe("aimass_hpc.serve.toymodels:slow_mlp", **kw),
        name="toy",
        extra_args=["--drain-grace-s", "0"],
    )
    with rep:
        rep.wait_ready()
        assert bool(_model_processes(rep.proc.pid)) is own_process
        if not own_process:
            assert "the model runs on a thread of the replica" in rep.log_text()


def test_a_full_batch_that_fails_at_load_leaves_the_choice_open(weights: Path) -> None:
    from aimass_hpc.serve.model_process import _batch_forward_s

    model = _loader(weights)()
    assert _batch_forward_s(model, 64) is not None

    def no_room(batch: np.ndarray) -> np.ndarray:
        raise MemoryError(f"no room for {len(batch)} rows")

    model.forward = no_room  # type: ignore[method-assign]
    assert _batch_forward_s(model, 64) is None
