"""Parallel sharded versions in the HDF5 repository: pieces with a layout, committed as one
version, loaded whole (serving, export) or as any region (resharding on another world size).
No torch.distributed here: the pieces are what ranks would write."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aimass_hpc.common.errors import IntegrityError
from aimass_hpc.repo import ModelRepository


def _save_pieces(repo: ModelRepository, key: str, w: torch.Tensor, m: torch.Tensor) -> None:
    """Rows 0-2 on rank 0, rows 3-4 on rank 1 (FSDP's uneven Shard(0)); bias replicated."""
    for rank, rows in enumerate((slice(0, 3), slice(3, 5))):
        off = [rows.start, 0]
        repo.save_shard(
            "net",
            {"w": w[rows].clone(), "b": torch.ones(2)},
            key=key,
            rank=rank,
            world_size=2,
            optimizer={"state": {0: {"exp_avg": m[rows].clone(), "step": torch.tensor(7.0)}}},
            extra={"step": 7} if rank == 0 else None,
            layout={
                "model/w": {"global_shape": [5, 3], "offsets": off},
                "optimizer/state.0.exp_avg": {"global_shape": [5, 3], "offsets": off},
            },
        )


def test_pieces_load_whole_and_as_any_region(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    w, m = torch.randn(5, 3), torch.randn(5, 3)
    _save_pieces(repo, "k1", w, m)
    v = repo.commit_shards("net", "k1", world_size=2, tags=["checkpoint"])
    shards = v.metadata["shards"]
    assert [s["layout"]["model/w"]["offsets"] for s in shards] == [[0, 0], [3, 0]]
    assert all(len(s["checksum"]) == 16 for s in shards)
    whole = repo.load(v.ref)
    assert torch.equal(whole.state_dict["w"], w) and torch.equal(
        whole.state_dict["b"], torch.ones(2)
    )
    assert torch.equal(whole.optimizer["state"][0]["exp_avg"], m)
    assert whole.optimizer["state"][0]["step"] == 7 and whole.extra == {"step": 7}
    # A reader whose shard is rows 1-3 (crossing both pieces) gets exactly those rows.
    region = repo.load(v.ref, select=lambda name, shape: ((1, 0), (3, 3)))
    assert torch.equal(region.state_dict["w"], w[1:4])
    assert torch.equal(region.optimizer["state"][0]["exp_avg"], m[1:4])


def test_uncommitted_pieces_stay_invisible(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    w, m = torch.randn(5, 3), torch.randn(5, 3)
    _save_pieces(repo, "k1", w, m)
    first = repo.commit_shards("net", "k1", world_size=2)
    _save_pieces(repo, "k2", w + 1, m)  # a save killed before its commit
    assert [x.ref for x in repo.versions("net")] == [first.ref]
    assert torch.equal(repo.load("net").state_dict["w"], w)


def test_a_layout_that_leaves_a_hole_is_refused(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    for rank in range(2):
        repo.save_shard(
            "net",
            {"w": torch.zeros(2, 3)},
            key="holes",
            rank=rank,
            world_size=2,
            layout={"model/w": {"global_shape": [5, 3], "offsets": [rank * 2, 0]}},
        )
    v = repo.commit_shards("net", "holes", world_size=2)
    with pytest.raises(IntegrityError, match="cover 12 of 15"):
        repo.load(v.ref)
