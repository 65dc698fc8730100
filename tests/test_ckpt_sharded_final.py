"""A sharded (FSDP) final model carries FLOPs per sample and peak memory like a whole one.

One rank of a real FSDP backend (gloo, in this process): the module's parameters are
DTensors, the measure runs FSDP's own forward, the final version is saved as a sharded
version, and ``aimass models search --flops/--memory`` finds it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from aimass_hpc.cli import main
from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime import model_stats, sharded
from aimass_hpc.runtime.checkpoint import RepositoryStore, SaveInfo, TrainState
from aimass_hpc.runtime.distributed import Backend, connect
from aimass_hpc.runtime.env import WorldInfo


@pytest.fixture
def fsdp() -> Iterator[Backend]:
    backend = connect("fsdp", WorldInfo(), device="cpu")
    try:
        yield backend
    finally:
        backend.shutdown()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, _ = capsys.readouterr()
    return int(exc.value.code or 0), out


def test_sharded_module_is_measured_as_the_whole_model(fsdp: Backend) -> None:
    whole = _mlp()
    model = fsdp.wrap_model(copy.deepcopy(whole))
    assert model_stats.is_sharded(model) and not model_stats.is_sharded(whole)
    sample = torch.zeros(1, 64)
    got = model_stats.measure(model, sample)
    want = model_stats.measure(whole, sample)
    assert got.flops_per_sample == want.flops_per_sample == 2 * (64 * 32 + 32 * 10)
    assert got.peak_memory_bytes == want.peak_memory_bytes
    assert model.training  # its mode put back


def test_sharded_final_carries_cost_and_is_found_by_search(
    fsdp: Backend, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = fsdp.wrap_model(_mlp())
    stats = model_stats.measure(model, torch.zeros(1, 64))
    pieces, _, layout = sharded.local_state(model, None)
    assert layout  # really saved as pieces with a layout
    run = tmp_path / "run"
    run.mkdir()
    store = RepositoryStore(tmp_path / "repo", "mlp", run)
    info = SaveInfo(
        kind="final",
        flops_per_sample=stats.flops_per_sample,
        peak_memory_bytes=stats.peak_memory_bytes,
        model_type="classifier",
    )
    ref = store.save_sharded(TrainState(model=pieces, layout=layout), info, fsdp)
    assert ref is not None
    version = ModelRepository(tmp_path / "repo").get(ref)
    assert version.metadata.get("shards")  # a sharded version
    assert version.flops_per_sample == 2 * (64 * 32 + 32 * 10)
    repo = str(tmp_path / "repo")
    code, out = _cli(capsys, "models", "--repo", repo, "search", "--flops", "1K..10K", "--json")
    assert code == 0 and [v["ref"] for v in json.loads(out)] == [ref]
    mem = version.peak_memory_bytes
    assert mem is not None and mem > 0
    code, out = _cli(capsys, "models", "--repo", repo, "search", "--memory",
                     f"{mem / 1024}K..{mem / 1024}K", "--json")  # fmt: skip
    assert code == 0 and [v["ref"] for v in json.loads(out)] == [ref]
    code, out = _cli(capsys, "models", "--repo", repo, "search", "--flops", "1M..", "--json")
    assert code == 0 and json.loads(out) == []
