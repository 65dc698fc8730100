"""FSDP2 training and parallel sharded checkpoints, with real ranks on this machine (Gloo).

Ranks are real processes (``python -m aimass_hpc.runtime train``) meeting over localhost, as
in tests/test_train_runtime.py; checkpoints go to a real HDF5 repository.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.config import RunConfig, TrainParams

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits"


def _config(tmp: Path, name: str, backend: str, **more: object) -> Path:
    run_dir = tmp / name
    run_dir.mkdir()
    params = {"batch_size": 64, "epochs": 1, "seed": 1, "lr": 0.01, "optimizer": "adam"}
    params.update(more.pop("train", {}))  # type: ignore[call-overload]
    cfg = RunConfig(
        run_dir=str(run_dir),
        backend=backend,
        task="digits_mlp:build",
        task_args={"dropout": 0.0},
        train=TrainParams(**params),  # type: ignore[arg-type]
        pythonpath=[str(DIGITS)],
        repository=str(tmp / "repo"),
        model_name="digits",
        **more,  # type: ignore[arg-type]
    )
    path = run_dir / "train.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return path


def _run(config: Path, world: int, port: int) -> dict:
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
    codes = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode:
            print(err.decode(errors="replace"), file=sys.stderr)
        codes.append(p.returncode)
    assert codes == [0] * world
    return json.loads((config.parent / "result.json").read_text())


def _checkpoints(run_dir: Path) -> list[dict]:
    lines = (run_dir / "checkpoints.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == "checkpoint"]


def _port() -> int:
    return 29700 + os.getpid() % 200


def test_fsdp_two_ranks_match_one_process_and_load_unsharded(tmp_path: Path) -> None:
    one = _run(_config(tmp_path, "one", "torch"), 1, 0)
    two = _run(_config(tmp_path, "two", "fsdp"), 2, _port())
    repo = ModelRepository(tmp_path / "repo")
    final = repo.get(two["final_ref"])
    assert final.kind == "sharded" and len(final.metadata["shards"]) == 2
    shard = final.metadata["shards"][1]
    # The manifest: each shard's checksum and, per tensor, global shape and offsets.
    assert len(shard["checksum"]) == 16
    assert shard["layout"]["model/0.weight"]["global_shape"] == [64, 64]
    assert shard["layout"]["model/0.weight"]["offsets"] == [32, 0]
    a = repo.load(one["final_ref"]).state_dict
    b = repo.load(two["final_ref"]).state_dict  # a whole, unsharded state dict
    assert set(a) == set(b)
    # Same samples per step, gradients averaged: only float summation order differs.
    for k in a:
        assert a[k].shape == b[k].shape
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k
    for key in ("val_loss", "accuracy", "train_loss"):
        assert one["metrics"][key] == pytest.approx(two["metrics"][key], abs=1e-5), key


def test_saved_on_four_ranks_resumes_on_two_and_four(tmp_path: Path) -> None:
    """4 ranks to step 10, then 10 more steps on 4 ranks (bit-exact) and on 2 (tolerance)."""
    port = _port() + 10
    common = {"checkpoint_every": 10}
    full = _run(_config(tmp_path, "full", "fsdp", train={**common, "steps": 20}), 4, port)
    half = _run(_config(tmp_path, "half", "fsdp", train={**common, "steps": 10}), 4, port + 1)
    assert half["step"] == 10
    on4 = _config(
        tmp_path, "on4", "fsdp", train={**common, "steps": 20}, resume_from=str(tmp_path / "half")
    )
    on2 = _config(
        tmp_path, "on2", "fsdp", train={**common, "steps": 20}, resume_from=str(tmp_path / "half")
    )
    r4 = _run(on4, 4, port + 2)
    r2 = _run(on2, 2, port + 3)
    full_dir = tmp_path / "full"
    repo = ModelRepository(tmp_path / "repo")
    ckpt = repo.load(_checkpoints(tmp_path / "half")[-1]["ref"])
    assert ckpt.extra["step"] == 10 and ckpt.extra["world_size"] == 4
    # The first checkpoint of a resumed run has the resumed one as its parent (lineage).
    assert _checkpoints(on2.parent)[0]["parent"] == ckpt.version.ref
    a = repo.load(full["final_ref"])
    b = repo.load(r4["final_ref"])
    c = repo.load(r2["final_ref"])
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k
        assert torch.allclose(a.state_dict[k], c.state_dict[k], rtol=0, atol=1e-5), k
    # Optimizer state of the step-20 checkpoints: exact on 4 ranks, close on 2.
    end_full, end_4, end_2 = (
        repo.load(_checkpoints(d)[-1]["ref"]).optimizer for d in (full_dir, on4.parent, on2.parent)
    )
    for i, st in end_full["state"].items():
        for name, t in st.items():
            assert torch.equal(t, end_4["state"][i][name]), (i, name)
            assert torch.allclose(t, end_2["state"][i][name], rtol=0, atol=1e-5), (i, name)


def test_async_checkpoints_equal_sync_ones(tmp_path: Path) -> None:
    port = _port() + 20
    train = {"checkpoint_every": 5, "grad_clip": 0.5}  # clipping sharded gradients too
    sync = _run(_config(tmp_path, "sync", "fsdp", train=train), 2, port)
    asyn = _run(
        _config(tmp_path, "async", "fsdp", train={**train, "async_checkpoint": True}), 2, port + 1
    )
    assert [e["step"] for e in _checkpoints(tmp_path / "async")] == [5, 10, 15, 20, 22]
    repo = ModelRepository(tmp_path / "repo")
    for a, b in zip(_checkpoints(tmp_path / "sync"), _checkpoints(tmp_path / "async"), strict=True):
        x, y = repo.load(a["ref"]), repo.load(b["ref"])
        assert all(torch.equal(x.state_dict[k], y.state_dict[k]) for k in x.state_dict)
    a, b = repo.load(sync["final_ref"]).state_dict, repo.load(asyn["final_ref"]).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


KILL_DURING_COMMIT = """
import os, runpy, signal, sys
import aimass_hpc.repo.repository as repository
seen = []
def hook(stage):
    seen.append(stage)
    if seen.count("sidecar-written") == 2:  # the second checkpoint's commit, mid-way
        os.kill(os.getpid(), signal.SIGKILL)
repository.STAGE_HOOK = hook
sys.argv = ["aimass_hpc.runtime", "train", "--config", sys.argv[1]]
runpy.run_module("aimass_hpc.runtime", run_name="__main__")
"""


def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    train = {"checkpoint_every": 5, "async_checkpoint": True}
    whole = _run(_config(tmp_path, "whole", "fsdp", train=train), 1, 0)
    cfg = _config(tmp_path, "killed", "fsdp", train=train)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_COMMIT, str(cfg)], env=env, timeout=300
    )
    assert proc.returncode == -9
    saved = _checkpoints(cfg.parent)
    assert [e["step"] for e in saved] == [5]
    repo = ModelRepository(tmp_path / "repo")
    # The half-committed version is invisible; the previous one is the newest and loads.
    assert repo.latest("digits").ref == saved[0]["ref"]
    assert repo.load(saved[0]["ref"]).extra["step"] == 5
    resumed = _run(cfg, 1, 0)
    a, b = repo.load(whole["final_ref"]).state_dict, repo.load(resumed["final_ref"]).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
