"""Sharded checkpoints: one file per rank, committed as one version by a manifest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from aimass_hpc.common.errors import ConflictError, InputError, NotFoundError
from aimass_hpc.repo import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    return ModelRepository(tmp_path / "repo")


def shard(rank: int) -> tuple[dict, dict]:
    sd = {f"layer{rank}.weight": torch.full((4, 4), float(rank))}
    opt = {"state": {0: {"exp_avg": torch.full((4,), float(rank))}}, "param_groups": [{}]}
    return sd, opt


def save_all(repo: ModelRepository, key: str, world: int = 3) -> None:
    for rank in range(world):
        sd, opt = shard(rank)
        repo.save_shard(
            "big", sd, key=key, rank=rank, world_size=world, optimizer=opt, extra={"rank": rank}
        )


def test_commit_load_verify_and_delete(repo) -> None:
    save_all(repo, "job1-step10")
    assert repo.names() == []  # invisible until committed
    v = repo.commit_shards("big", "job1-step10", world_size=3, metrics={"loss": 0.1})
    assert v.kind == "sharded" and v.metadata["world_size"] == 3 and v.param_count == 48
    merged = repo.load("big")
    assert sorted(merged.state_dict) == ["layer0.weight", "layer1.weight", "layer2.weight"]
    assert [e["rank"] for e in merged.extra] == [0, 1, 2]
    one = repo.load("big", shard=1)
    assert list(one.state_dict) == ["layer1.weight"] and one.extra == {"rank": 1}
    assert torch.equal(one.optimizer["state"][0]["exp_avg"], torch.ones(4))
    report = repo.verify("big")
    assert report.ok and report.tensors == 6  # weight + exp_avg per rank
    assert {e["shard"] for e in repo.manifest("big")} == {0, 1, 2}
    with pytest.raises(InputError, match="shards 0..2"):
        repo.load("big", shard=3)
    shard_dir = repo.root / "models/big/shards/job1-step10"
    assert shard_dir.is_dir()
    repo.delete("big:1")
    assert not shard_dir.exists()


def test_incomplete_or_repeated_commits_are_refused(repo) -> None:
    sd, _ = shard(0)
    repo.save_shard("big", sd, key="k", rank=0, world_size=2)
    with pytest.raises(ConflictError, match="missing rank"):
        repo.commit_shards("big", "k", world_size=2)
    repo.save_shard("big", sd, key="k", rank=1, world_size=2)
    repo.commit_shards("big", "k", world_size=2)
    with pytest.raises(ConflictError, match="already committed as big:1"):
        repo.commit_shards("big", "k", world_size=2)
    with pytest.raises(NotFoundError, match="no shards saved under key 'nope'"):
        repo.commit_shards("big", "nope", world_size=2)
    with pytest.raises(InputError, match="rank"):
        repo.save_shard("big", sd, key="k2", rank=2, world_size=2)
    with pytest.raises(InputError, match="in more than one shard"):
        repo.load("big")  # both ranks hold layer0.weight
    assert repo.load("big", shard=1).state_dict["layer0.weight"].sum() == 0


def test_corrupt_shard_is_named(repo) -> None:
    save_all(repo, "k")
    repo.commit_shards("big", "k", world_size=3)
    path = repo.root / "models/big/shards/k/rank-00002-of-00003.h5"
    os.truncate(path, path.stat().st_size // 2)
    report = repo.verify("big")
    assert not report.ok and report.error.startswith("shard 2: file is truncated")


def test_gc_keeps_committed_shards_and_removes_stale_uncommitted_ones(repo) -> None:
    save_all(repo, "done")
    repo.commit_shards("big", "done", world_size=3)
    save_all(repo, "abandoned")
    assert repo.gc(grace_seconds=3600).removed == []  # young: a job may still be writing
    removed = repo.gc(grace_seconds=0).removed
    assert [Path(p).name for p in removed] == ["abandoned"]
    assert repo.verify("big").ok
