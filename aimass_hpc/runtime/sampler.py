"""Which samples each rank trains on, as a pure function of (seed, epoch, batch index).

A *global* batch of ``batch_size`` samples is cut out of a seeded per-epoch permutation and
split evenly over the ranks, so a run on N ranks averages gradients over exactly the samples a
single-process run would see. The sampler position is just ``(epoch, batch)``: a resumed job
recomputes the same permutation, which is what makes resume exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardedBatches:
    """Deterministic global batches split over ranks (the last partial batch is dropped)."""

    num_samples: int
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size {self.batch_size} must be a positive multiple of the world size "
                f"{self.world_size} (it is the global batch, split evenly over ranks)"
            )
        if self.num_samples < self.batch_size:
            raise ValueError(
                f"dataset has {self.num_samples} samples, fewer than one batch ({self.batch_size})"
            )

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (same on every rank)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=gen)

    def local_indices(self, order: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's share of global batch ``batch`` in ``order``."""
        start = batch * self.batch_size + self.rank * self.local_batch_size
        return order[start : start + self.local_batch_size]

    def position(self, step: int) -> tuple[int, int]:
        """``(epoch, batch)`` of global step ``step`` (steps count from 0)."""
        return divmod(step, self.batches_per_epoch)


def shard_range(num_samples: int, world_size: int, rank: int) -> range:
    """A contiguous, near-equal slice of ``range(num_samples)`` for evaluation on ``rank``."""
    per, extra = divmod(num_samples, world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))
