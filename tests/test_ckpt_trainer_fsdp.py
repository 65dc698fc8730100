"""Trainer on a 1-rank FSDP backend:
the sharded final carries FLOPs/peak memory; async snapshots reuse host buffers."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from aimass_hpc.repo import ModelRepository
from aimass_hpc.runtime.checkpoint import RepositoryStore
from aimass_hpc.runtime.config import TrainParams
from aimass_hpc.runtime.distributed import connect
from aimass_hpc.runtime.env import WorldInfo
from aimass_hpc.runtime.task import TrainTask
from aimass_hpc.runtime.trainer import Trainer


def test_fsdp_trainer_final_has_cost_and_async_saves_reuse_buffers(tmp_path: Path) -> None:
    backend = connect("fsdp", WorldInfo(), device="cpu")
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        data = TensorDataset(torch.randn(64, 64), torch.randint(0, 10, (64,)))
        task = TrainTask(model=model, train=data, loss=nn.CrossEntropyLoss())
        run = tmp_path / "run"
        run.mkdir()
        store = RepositoryStore(tmp_path / "repo", "mlp", run)
        params = TrainParams(batch_size=16, steps=6, checkpoint_every=2, async_checkpoint=True)
        trainer = Trainer(task, params, backend=backend, store=store)
        result = trainer.fit()
        assert trainer._host_buffers.nbytes > 0  # async snapshots went through the buffers
        final = ModelRepository(tmp_path / "repo").get(result.final_ref)
        assert final.metadata.get("shards")
        assert final.flops_per_sample == 2 * (64 * 32 + 32 * 10)
        assert final.peak_memory_bytes and final.model_type == "classifier"
    finally:
        backend.shutdown()
